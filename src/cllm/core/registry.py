"""Method registries: a config dataclass type -> the handler that runs it.

`cllm quantize`, `cllm prune` and `cllm export` each keep one `Registry`. A method (or an
export target) is one module holding its config dataclass and its handler, registered with
`@REGISTRY.register("name")`; the CLI finds the config class by the name a user types and
the pipeline finds the handler by the config's type, so adding a method touches no command.
Third-party methods register the same way from a `cllm.plugins` entry point.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from cllm.errors import UsageError

H = TypeVar("H", bound=Callable[..., Any])


@dataclass(frozen=True)
class Entry(Generic[H]):
    name: str
    config: type
    handler: H


class Registry(Generic[H]):
    def __init__(self, what: str) -> None:
        self.what = what  # "quantization method", "pruning method", "export target"
        self._by_name: dict[str, Entry[H]] = {}
        self._by_type: dict[type, Entry[H]] = {}

    def register(self, name: str, config: type) -> Callable[[H], H]:
        """Decorator for a handler: `@PRUNERS.register("wanda", WandaConfig)`."""

        def deco(handler: H) -> H:
            if name in self._by_name and self._by_name[name].handler is not handler:
                raise ValueError(f"{self.what} {name!r} is registered twice")
            entry = Entry(name, config, handler)
            self._by_name[name] = entry
            self._by_type[config] = entry
            return handler

        return deco

    def names(self) -> list[str]:
        return sorted(self._by_name)

    def config_class(self, name: str) -> type:
        return self._entry(name).config

    def handler_for(self, cfg: Any) -> H:
        try:
            return self._by_type[type(cfg)].handler
        except KeyError:
            raise UsageError(f"no {self.what} handles {type(cfg).__name__}") from None

    def name_of(self, cfg: Any) -> str:
        return self._by_type[type(cfg)].name

    def _entry(self, name: str) -> Entry[H]:
        try:
            return self._by_name[name]
        except KeyError:
            raise UsageError(
                f"unknown {self.what} {name!r}", "Choose one of " + ", ".join(self.names())
            ) from None

    def __contains__(self, name: str) -> bool:
        return name in self._by_name
