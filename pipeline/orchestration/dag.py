"""The stage graph as DVC sees it: parsed from `dvc dag --dot`, never a second hand-written DAG.

DVC has no public graph API. `dvc dag --dot` is its documented CLI view: one `"stage";` line per node and
one `"upstream" -> "downstream";` line per edge (checked against `dvc.repo.Repo(...).index.graph` by
tests/test_orchestration.py, which fails if either moves).
"""

from __future__ import annotations

import hashlib
import re
import subprocess
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

NODE = re.compile(r'^"(?P<name>[^"]+)";$')
EDGE = re.compile(r'^"(?P<up>[^"]+)" -> "(?P<down>[^"]+)";$')


class GraphError(ValueError):
    """A target DVC does not know, or output `dvc dag --dot` no longer writes the way this parser expects."""


@dataclass(frozen=True)
class StageGraph:
    """upstream[stage] = the stages it depends on; keys keep DVC's own order (dvc.yaml order)."""

    upstream: dict[str, frozenset[str]]

    @property
    def stages(self) -> list[str]:
        return list(self.upstream)

    def order(self) -> list[str]:
        """Topological order, ties broken by DVC's order (stable, so runs list stages the same way)."""
        placed: list[str] = []
        done: set[str] = set()
        while len(placed) < len(self.upstream):
            ready = [s for s in self.upstream if s not in done and self.upstream[s] <= done]
            if not ready:
                raise GraphError(f"cycle among {sorted(set(self.upstream) - done)}")
            placed.extend(ready)
            done.update(ready)
        return placed

    def levels(self) -> list[list[str]]:
        """Stages grouped by longest path from a root: each level's stages can run at the same time."""
        depth: dict[str, int] = {}
        for stage in self.order():
            depth[stage] = 1 + max((depth[u] for u in self.upstream[stage]), default=-1)
        grouped: list[list[str]] = [[] for _ in range(max(depth.values(), default=-1) + 1)]
        for stage, level in depth.items():
            grouped[level].append(stage)
        return grouped

    def width(self) -> int:
        """How many stages could run at once (largest level): what more device slots than this would waste."""
        return max((len(level) for level in self.levels()), default=0)

    def resolve(self, target: str) -> list[str]:
        """A stage name, or a foreach group (`msd` → every `msd@…`), as DVC's `repro` accepts them."""
        if target in self.upstream:
            return [target]
        group = [s for s in self.upstream if s.split("@", 1)[0] == target]
        if not group:
            raise GraphError(f"no stage {target!r} in dvc.yaml; stages: {', '.join(self.upstream)}")
        return group

    def restrict(self, targets: Iterable[str] | None) -> StageGraph:
        """The targets and everything upstream of them (all stages when no target is given)."""
        targets = list(targets or [])
        if not targets:
            return self
        keep: set[str] = set()
        todo = [s for t in targets for s in self.resolve(t)]
        while todo:
            stage = todo.pop()
            if stage not in keep:
                keep.add(stage)
                todo.extend(self.upstream[stage])
        return StageGraph({s: self.upstream[s] for s in self.upstream if s in keep})


def parse_dot(text: str) -> StageGraph:
    """`dvc dag --dot` output → StageGraph; edges point from upstream to downstream."""
    upstream: dict[str, set[str]] = {}
    for raw in text.splitlines():
        line = raw.strip()
        if edge := EDGE.match(line):
            upstream.setdefault(edge["up"], set())
            upstream.setdefault(edge["down"], set()).add(edge["up"])
        elif node := NODE.match(line):
            upstream.setdefault(node["name"], set())
        elif line and line not in {"strict digraph {", "}"}:
            raise GraphError(f"unexpected line in `dvc dag --dot` output: {line!r}")
    return StageGraph({s: frozenset(u) for s, u in upstream.items()})


CACHE = Path("scratch/dag")  # `dvc dag --dot` output by hash of what shapes the graph (git-ignored)


def _graph_key(root: Path) -> str:
    """dvc.yaml decides the stages, params.yaml their foreach expansions: the graph is a function of both."""
    digest = hashlib.sha256()
    for name in ("dvc.yaml", "params.yaml"):
        path = root / name
        digest.update(path.read_bytes() if path.exists() else b"")
    return digest.hexdigest()[:20]


def read_graph(root: Path) -> StageGraph:
    """The repository's stage graph: DVC's `dvc dag --dot` (4-6 s on a shared 2-core machine), cached per key."""
    cached = root / CACHE / f"{_graph_key(root)}.dot"
    if cached.exists():
        return parse_dot(cached.read_text())
    done = subprocess.run(
        [sys.executable, "-m", "dvc", "dag", "--dot"], cwd=root, capture_output=True, text=True
    )  # fmt: skip
    if done.returncode != 0:
        raise GraphError(f"`dvc dag --dot` failed in {root}:\n{done.stderr.strip() or done.stdout.strip()}")
    graph = parse_dot(done.stdout)  # parse first: a cache never holds output the parser refuses
    from pipeline.atomic import atomic_write_text  # only on a miss: it imports torch

    atomic_write_text(cached, done.stdout)
    return graph
