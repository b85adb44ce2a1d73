"""Every malformed checkpoint is refused on open with an InputError that names the problem."""

from __future__ import annotations

from pathlib import Path

import pytest

from cllm.core.eval.backends import check_finite
from cllm.errors import EXIT_USAGE, InputError, UsageError
from cllm.formats.checkpoint import open_checkpoint
from cllm.testing.badfiles import EXPECT, MALFORMED, NONFINITE, Sources


@pytest.fixture(scope="module")
def cases_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("bad-inputs")


def test_every_case_has_an_expected_message() -> None:
    assert set(EXPECT) == set(MALFORMED)


@pytest.mark.parametrize("which", ["folder", "gguf"])
def test_sources_are_valid(bad_sources: Sources, which: str) -> None:
    ckpt = open_checkpoint(getattr(bad_sources, which))
    assert len(ckpt.tensor_infos()) == 21
    check_finite(ckpt)


@pytest.mark.parametrize("name", sorted(MALFORMED))
def test_malformed_input_is_refused(bad_sources: Sources, cases_root: Path, name: str) -> None:
    path = MALFORMED[name](bad_sources, cases_root / name)
    with pytest.raises(InputError) as info:
        open_checkpoint(path)
    err = info.value
    assert isinstance(err, UsageError)
    assert err.exit_code == EXIT_USAGE == 2
    assert EXPECT[name] in err.message
    assert "\n" not in err.one_line()


@pytest.mark.parametrize("name", sorted(NONFINITE))
def test_nonfinite_weights_open_but_fail_check_finite(
    bad_sources: Sources, cases_root: Path, name: str
) -> None:
    ckpt = open_checkpoint(NONFINITE[name](bad_sources, cases_root / name))
    with pytest.raises(InputError, match="non-finite") as info:
        check_finite(ckpt)
    assert "model.layers.1.mlp.down_proj.weight" in info.value.message
    assert info.value.exit_code == 2
