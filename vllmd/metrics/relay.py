"""`GET /metrics/engines`: every running engine's own `/metrics`, in one exposition.

The engines are asked concurrently, each with a short deadline: a slow or broken engine is
skipped (its `vllmd_engine_scrape_success` is 0), never waited for. The texts are merged per
metric family, so each family's `# HELP`/`# TYPE` appears once and its samples stay together
(the text format requires both). Labels are left as the engines wrote them: vLLM's
`model_name` tells the engines apart.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

import anyio
import structlog

from vllmd.instance.states import SCRAPED, InstanceState

log = structlog.get_logger("vllmd.engines_metrics")

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
SCRAPE_TIMEOUT = 2.0
# Sample names of a family named `name`: `name` itself or one of these suffixes.
_SUFFIXES = ("_total", "_bucket", "_sum", "_count", "_created", "_info", "_gsum", "_gcount")


class MetricsSource(Protocol):
    """An engine's `/metrics` (`EngineAPI` is one)."""

    async def metrics(self, timeout: float = ...) -> str: ...


class Engine(Protocol):
    """What the relay reads of an instance."""

    @property
    def name(self) -> str: ...
    @property
    def state(self) -> InstanceState: ...
    @property
    def api(self) -> MetricsSource | None: ...


def running(instances: Iterable[Engine]) -> dict[str, MetricsSource]:
    """The engines to scrape: those that exist and serve, by model."""
    return {
        inst.name: api
        for inst in instances
        if inst.state in SCRAPED and (api := inst.api) is not None
    }


async def scrape(
    sources: Mapping[str, MetricsSource], timeout: float = SCRAPE_TIMEOUT
) -> dict[str, str | None]:
    """Every source's exposition text, by model; None where it failed or took too long."""
    texts: dict[str, str | None] = dict.fromkeys(sources)

    async def one(model: str, source: MetricsSource) -> None:
        with anyio.move_on_after(timeout):
            try:
                texts[model] = await source.metrics(timeout=timeout)
            except Exception as exc:  # one engine's failure is its scrape_success 0, no more
                log.info("engine_scrape_failed", model=model, error=str(exc) or repr(exc))
            return
        log.info("engine_scrape_timeout", model=model, timeout=timeout)

    async with anyio.create_task_group() as tg:
        for model, source in sources.items():
            tg.start_soon(one, model, source)
    return texts


@dataclass
class _Family:
    help: str | None = None
    type: str | None = None
    samples: list[str] = field(default_factory=list)

    def describe(self, kind: str, text: str) -> None:
        """A HELP or TYPE line: the first one of each kind wins."""
        if kind == "HELP" and self.help is None:
            self.help = text
        elif kind == "TYPE" and self.type is None:
            self.type = text


def merge(texts: Mapping[str, str | None]) -> str:
    """One exposition of every text (None: a failed scrape), plus `vllmd_engine_scrape_success`
    per model. Families keep the order they are first seen in; the first HELP/TYPE wins.
    Every sample gets its engine's `model` label: engines' own series (process_*, python_*,
    vllm:cache_config_info) would otherwise repeat the same series once per engine."""
    families: dict[str, _Family] = {}
    for model, text in texts.items():
        if text:
            _parse_into(text, families, f'model="{_escape(model)}"')
    out: list[str] = []
    for name, family in families.items():
        if family.help is not None:
            out.append(f"# HELP {name} {family.help}")
        if family.type is not None:
            out.append(f"# TYPE {name} {family.type}")
        out.extend(family.samples)
    out += [
        "# HELP vllmd_engine_scrape_success 1 when the engine's /metrics was read in time.",
        "# TYPE vllmd_engine_scrape_success gauge",
    ]
    for model in sorted(texts):
        ok = 1 if texts[model] is not None else 0
        out.append(f'vllmd_engine_scrape_success{{model="{_escape(model)}"}} {ok}')
    return "\n".join(out) + "\n"


async def relay(instances: Iterable[Engine], timeout: float = SCRAPE_TIMEOUT) -> bytes:
    """The body of `GET /metrics/engines` (content type `CONTENT_TYPE`)."""
    return merge(await scrape(running(instances), timeout)).encode()


def _parse_into(text: str, families: dict[str, _Family], label: str) -> None:
    current: str | None = None  # the family the last HELP/TYPE line named
    for raw in text.splitlines():
        line = raw.strip()
        if not line:
            continue
        if line.startswith("#"):
            parts = line.split(None, 3)
            if len(parts) >= 3 and parts[1] in ("HELP", "TYPE"):
                current = parts[2]
                family = families.setdefault(current, _Family())
                rest = parts[3] if len(parts) > 3 else ""
                family.describe(parts[1], rest)
            continue  # other comments are dropped
        name = _sample_name(line)
        if current is None or not _belongs(name, current):
            current = name  # an untyped sample: its own family
        families.setdefault(current, _Family()).samples.append(_labelled(line, name, label))


def _labelled(line: str, name: str, label: str) -> str:
    """The sample `line` with `label` first among its labels."""
    rest = line[len(name) :]
    if rest.startswith("{"):
        inner = rest[1:]
        return f"{name}{{{label}{'' if inner.startswith('}') else ','}{inner}"
    return f"{name}{{{label}}}{rest}"


def _sample_name(line: str) -> str:
    end = len(line)
    for stop in ("{", " "):
        at = line.find(stop)
        if 0 <= at < end:
            end = at
    return line[:end]


def _belongs(sample: str, family: str) -> bool:
    if sample == family:
        return True
    return sample.startswith(family) and sample[len(family) :] in _SUFFIXES


def _escape(value: str) -> str:
    return value.replace("\\", r"\\").replace("\n", r"\n").replace('"', r"\"")
