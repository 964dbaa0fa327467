"""The search space: text-encoding DAGs after the word embedding (node 0).

A Genotype has N layer nodes (1 <= N <= max_depth). Node j (1-based) applies
one operation to exactly one earlier node, among the 5 most recent:
max(0, j-5) .. j-1. Since every node has a single input, the DAG is a tree
rooted at the embedding; the network merges the outputs of all N nodes,
by a learned weighted sum (the searched space) or by concatenation.

Two genotypes build the same network exactly when their trees are
isomorphic with the same operations (node numbering is only an order of
construction): `canonical()` is that tree in a canonical form and
`hash()` a digest of it.
"""
from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass
from typing import Optional, Sequence

OPERATIONS = ("conv1", "conv3", "conv5", "conv7", "maxpool3", "avgpool3", "bilstm", "bigru")
MERGES = ("sum", "concat")
WINDOW = 5
DEFAULT_MAX_DEPTH = 6
MUTATIONS = ("input", "operation", "add")


def input_window(j: int) -> range:
    """The nodes node j may read: the 5 most recent earlier nodes (0 is the embedding)."""
    return range(max(0, j - WINDOW), j)


@dataclass(frozen=True)
class Genotype:
    """nodes[j-1] = (operation, input node) for node j = 1..N."""
    nodes: tuple[tuple[str, int], ...]
    merge: str = "sum"

    def __post_init__(self):
        object.__setattr__(self, "nodes", tuple((str(op), int(i)) for op, i in self.nodes))
        self.validate()

    # ---- invariants ----------------------------------------------------------------------------
    def validate(self, max_depth: Optional[int] = None) -> None:
        if not self.nodes:
            raise ValueError("a genotype needs at least one layer node")
        if max_depth is not None and len(self.nodes) > max_depth:
            raise ValueError(f"{len(self.nodes)} layer nodes exceed the maximum depth {max_depth}")
        if self.merge not in MERGES:
            raise ValueError(f"unknown merge {self.merge!r}; expected one of {MERGES}")
        for j, (op, i) in enumerate(self.nodes, start=1):
            if op not in OPERATIONS:
                raise ValueError(f"node {j}: unknown operation {op!r}; expected one of {OPERATIONS}")
            if i not in input_window(j):
                w = input_window(j)
                raise ValueError(f"node {j}: input {i} outside its window {w.start}..{w.stop - 1}")

    @property
    def depth(self) -> int:
        return len(self.nodes)

    def children(self) -> list[list[int]]:
        """children()[i] = the nodes that read node i (i = 0..N)."""
        ch: list[list[int]] = [[] for _ in range(len(self.nodes) + 1)]
        for j, (_, i) in enumerate(self.nodes, start=1):
            ch[i].append(j)
        return ch

    # ---- identity ------------------------------------------------------------------------------
    def canonical(self) -> str:
        """The tree in canonical form (AHU encoding): equal iff the networks are the same."""
        ch = self.children()

        def enc(v: int) -> str:
            label = "emb" if v == 0 else self.nodes[v - 1][0]
            return label + "(" + ",".join(sorted(enc(c) for c in ch[v])) + ")"

        # concat order is a permutation of features the head can absorb: same network family
        return f"{self.merge}:{enc(0)}"

    def hash(self) -> str:
        return hashlib.sha1(self.canonical().encode()).hexdigest()[:16]

    # ---- serialisation -------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {"nodes": [[op, i] for op, i in self.nodes], "merge": self.merge}

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    @classmethod
    def from_dict(cls, d: dict) -> "Genotype":
        if not isinstance(d, dict) or "nodes" not in d:
            raise ValueError('a genotype is a JSON object {"nodes": [[op, input], ...], "merge": "sum"}')
        return cls(tuple((op, i) for op, i in d["nodes"]), d.get("merge", "sum"))

    @classmethod
    def from_json(cls, text: str) -> "Genotype":
        return cls.from_dict(json.loads(text))

    # ---- display -------------------------------------------------------------------------------
    def draw(self, weights: Optional[Sequence[float]] = None) -> str:
        """A text tree, one line per node, with the learned merge weights if given."""
        ch = self.children()
        lines = ["0 embedding"]

        def walk(v: int, prefix: str) -> None:
            for n, c in enumerate(ch[v]):
                last = n == len(ch[v]) - 1
                w = f"  w={weights[c - 1]:+.3f}" if weights is not None else ""
                lines.append(f"{prefix}{'└─ ' if last else '├─ '}{c} {self.nodes[c - 1][0]}{w}")
                walk(c, prefix + ("   " if last else "│  "))

        walk(0, "")
        how = "weighted sum" if self.merge == "sum" else "concatenation"
        lines.append(f"merge: {how} of nodes 1..{self.depth}")
        return "\n".join(lines)

    def __str__(self) -> str:
        return " ".join(f"{j}:{op}<{i}" for j, (op, i) in enumerate(self.nodes, start=1)) + f" [{self.merge}]"


# ---- sampling and mutation ---------------------------------------------------------------------

def random_genotype(rng: random.Random, max_depth: int = DEFAULT_MAX_DEPTH, *,
                    first: Optional[tuple[str, int]] = None, merge: str = "sum") -> Genotype:
    """Depth uniform in 1..max_depth, operations uniform, inputs uniform in each window.

    `first` fixes node 1 (e.g. ("bilstm", 0): a BiLSTM reading the embedding).
    """
    n = rng.randint(1, max_depth)
    nodes = []
    for j in range(1, n + 1):
        if j == 1 and first is not None:
            nodes.append(first)
        else:
            nodes.append((rng.choice(OPERATIONS), rng.choice(input_window(j))))
    return Genotype(tuple(nodes), merge)


def _with_node(g: Genotype, j: int, node: tuple[str, int]) -> Genotype:
    nodes = list(g.nodes)
    nodes[j - 1] = node
    return Genotype(tuple(nodes), g.merge)


def _candidates(g: Genotype, kind: str, max_depth: int, frozen: int) -> list[Genotype]:
    """Every genotype one mutation of `kind` away from g (nodes 1..frozen are kept)."""
    out = []
    if kind == "input":
        for j, (op, i) in enumerate(g.nodes, start=1):
            if j > frozen:
                out += [_with_node(g, j, (op, k)) for k in input_window(j) if k != i]
    elif kind == "operation":
        for j, (op, i) in enumerate(g.nodes, start=1):
            if j > frozen:
                out += [_with_node(g, j, (o, i)) for o in OPERATIONS if o != op]
    elif kind == "add":
        if g.depth < max_depth:
            j = g.depth + 1
            out += [Genotype(g.nodes + ((o, k),), g.merge) for o in OPERATIONS for k in input_window(j)]
    else:
        raise ValueError(f"unknown mutation {kind!r}; expected one of {MUTATIONS}")
    return out


def mutate(g: Genotype, rng: random.Random, max_depth: int = DEFAULT_MAX_DEPTH, *,
           kinds: Sequence[str] = MUTATIONS, frozen: int = 0) -> tuple[Genotype, str]:
    """One mutation (change an input, change an operation, add a layer) drawn uniformly among
    the kinds that can produce a different network, then uniformly among that kind's results.

    The child always builds a different network from the parent (different canonical form).
    `frozen` keeps nodes 1..frozen as they are (a constraint such as "node 1 is a BiLSTM").
    Returns (child, kind).
    """
    parent = g.canonical()
    kinds = list(kinds)
    rng.shuffle(kinds)
    for kind in kinds:
        options = [c for c in _candidates(g, kind, max_depth, frozen) if c.canonical() != parent]
        if options:
            return rng.choice(options), kind
    raise ValueError(f"no mutation of {g} yields a different network")
