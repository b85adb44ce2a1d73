"""One lm-eval model class for every backend cllm runs (torch, llama.cpp, onnxruntime).

lm-eval's own `gguf` model is an HTTP client (one request per item, no rolling
log-likelihood); this class runs the backend in process (llama.cpp and onnxruntime in a
worker, as everywhere in cllm) and hands it requests grouped by shared prefix, so the
context of a multiple-choice question is evaluated once for all its choices.

Token handling follows lm-eval's `HFLM` for causal models, so scores are comparable with
`lm_eval --model hf`: the input is `(context + continuation)[-(max_length + 1):][:-1]` and
the last `len(continuation)` positions are scored; an empty context gets the prefix token
(EOS unless the tokenizer has BOS handling of its own).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM

from cllm.core.tasks.scoring import Group

Request = tuple[Any, list[int], list[int]]  # (cache key, context ids, continuation ids)


class CllmLM(TemplateLM):
    """`scorer` has `score(groups)` and `generate(prompt, max_new, stop)` (see
    `cllm.core.tasks.sessions`); `tokenizer` is the model's transformers tokenizer."""

    def __init__(
        self, scorer: Any, tokenizer: Any, max_length: int = 2048, batch_size: int = 64,
        max_gen_toks: int = 256, on_progress: Any = None,
    ) -> None:  # fmt: skip
        super().__init__()
        self.scorer = scorer
        self.tokenizer = tokenizer
        self._max_length = max_length
        self.batch_size = batch_size  # requests sent to the backend per call
        self.max_gen_toks = max_gen_toks
        self.on_progress = on_progress or (lambda n: None)

    # -- what lm-eval asks of a model ---------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return int(self.tokenizer.eos_token_id)

    @property
    def max_length(self) -> int:
        return self._max_length

    def tok_encode(
        self, string: str, add_special_tokens: bool | None = None, **_: Any
    ) -> list[int]:
        return list(self.tokenizer.encode(string, add_special_tokens=bool(add_special_tokens)))

    def tok_decode(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens)

    def loglikelihood(self, requests: list[Any], disable_tqdm: bool = False) -> list[Any]:
        return super().loglikelihood(requests, disable_tqdm=True)  # cllm shows its own progress

    def _loglikelihood_tokens(
        self, requests: list[Request], disable_tqdm: bool = False, **_: Any
    ) -> list[tuple[float, bool]]:
        """Requests grouped by the prefix they share, in the order the grouping finds them;
        results go back in the requests' order."""
        pieces = []
        for _key, context, continuation in requests:
            whole = (context + continuation)[-(self.max_length + 1) :]
            n = len(continuation)
            inp = whole[:-1]
            # the prefix stops before the position that predicts the first continuation
            # token: that position's logits are scored, so it belongs to the tail
            split = max(len(inp) - n, 0)
            pieces.append((inp[:split], inp[split:], whole[-n:]))
        groups: OrderedDict[tuple[int, ...], list[int]] = OrderedDict()
        for i, (prefix, _tail, _target) in enumerate(pieces):
            groups.setdefault(tuple(prefix), []).append(i)
        results: list[tuple[float, bool] | None] = [None] * len(requests)
        batch: list[Group] = []
        members: list[list[int]] = []
        size = 0

        def flush() -> None:
            nonlocal batch, members, size
            if not batch:
                return
            for idx, scores in zip(members, self.scorer.score(batch), strict=True):
                for i, s in zip(idx, scores, strict=True):
                    results[i] = (float(s[0]), bool(s[1]))
            self.on_progress(size)
            batch, members, size = [], [], 0

        for key, idx in groups.items():
            batch.append((list(key), [(pieces[i][1], pieces[i][2]) for i in idx]))
            members.append(idx)
            size += len(idx)
            if size >= self.batch_size:
                flush()
        flush()
        assert all(r is not None for r in results)
        return results  # type: ignore[return-value]

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        """Whole-document log-likelihood in disjoint windows of `max_length` tokens, each
        conditioned on the previous token only (lm-eval's definition, which perplexity-style
        tasks use)."""
        out = []
        for req in requests:
            (string,) = req.args
            windows = [
                lm_utils.make_disjoint_window(w)
                for w in lm_utils.get_rolling_token_windows(
                    token_list=self.tok_encode(string),
                    prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length,
                    context_len=1,
                )
            ]
            scores = self._loglikelihood_tokens([(None, c, t) for c, t in windows])
            out.append(sum(s for s, _ in scores))
        return out

    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        """Greedy decoding until one of the request's stop strings (or EOS, or its
        `max_gen_toks`)."""
        out = []
        for req in requests:
            context, kwargs = req.args
            stops = kwargs.get("until") or []
            if isinstance(stops, str):
                stops = [stops]
            max_new = int(kwargs.get("max_gen_toks", self.max_gen_toks))
            prompt = self.tok_encode(context)[-(self.max_length - max_new) :]
            ids = self.scorer.generate(prompt, max_new, [self.eot_token_id])
            text = self.tok_decode(ids)
            for s in stops:
                if s and s in text:
                    text = text.split(s)[0]
            out.append(text)
            self.on_progress(1)
        return out
