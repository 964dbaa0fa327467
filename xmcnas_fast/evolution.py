"""Regularized evolution (Real et al. 2019) and random search, as pure logic.

No torch, no files: a strategy proposes architectures and is told their
fitness (validation P@5). The interface is asynchronous so that W workers keep
W candidates in flight: `propose()` gives the next candidate to train (or None
when none can be proposed yet), `report(id, fitness)` takes a finished one.
With one worker, propose and report alternate and the loop is exactly Real et
al.'s: a population of P random architectures, then C cycles of sample S,
take the best as parent, mutate, train the child, add it, drop the oldest.

Everything random comes from one seeded generator, so the same sequence of
calls gives the same history; a search is resumed by replaying its log.
"""
from __future__ import annotations

import math
import random
from collections import deque
from dataclasses import dataclass
from typing import Optional

from .space import DEFAULT_MAX_DEPTH, Genotype, mutate, random_genotype


@dataclass
class Candidate:
    id: int
    genotype: Genotype
    parent: Optional[int] = None          # None: drawn at random
    mutation: Optional[str] = None        # "input" | "operation" | "add"
    constrained: bool = False             # node 1 fixed by the constraint (kept by its children)
    fitness: Optional[float] = None       # validation P@5; None until reported (or a failed run)
    reused_from: Optional[int] = None     # an identical network trained before: its result is reused


def _key(c: Candidate) -> float:
    return -math.inf if c.fitness is None else c.fitness


class RandomSearch:
    """The ablation: the same budget of P + C architectures, all drawn at random (no duplicates)."""

    def __init__(self, population_size: int = 20, cycles: int = 50, *, max_depth: int = DEFAULT_MAX_DEPTH,
                 seed: int = 0, constraint: Optional[tuple] = None, constraint_fraction: float = 0.0,
                 max_redraws: int = 100, **_):
        self.P, self.C, self.max_depth = population_size, cycles, max_depth
        self.rng = random.Random(seed)
        self.constraint, self.constraint_fraction = constraint, constraint_fraction
        self.max_redraws = max_redraws
        self.candidates: dict[int, Candidate] = {}
        self.by_hash: dict[str, int] = {}          # canonical hash -> first candidate with it
        self.history: list[Candidate] = []         # reported, in report order
        self.proposed = 0

    @property
    def budget(self) -> int:
        return self.P + self.C

    @property
    def exhausted(self) -> bool:
        return self.proposed >= self.budget

    @property
    def done(self) -> bool:
        return len(self.history) >= self.budget

    def _new(self, genotype: Genotype, **kw) -> Candidate:
        c = Candidate(self.proposed, genotype, **kw)
        self.proposed += 1
        self.candidates[c.id] = c
        self.by_hash.setdefault(genotype.hash(), c.id)
        return c

    def _random(self, constrained: bool) -> Genotype:
        first = self.constraint if constrained else None
        for _ in range(self.max_redraws):
            g = random_genotype(self.rng, self.max_depth, first=first)
            if g.hash() not in self.by_hash:
                return g
        raise RuntimeError("the search space seems exhausted: no new random architecture found")

    def _constrained_draw(self) -> bool:
        return self.constraint is not None and self.rng.random() < self.constraint_fraction

    def propose(self) -> Optional[Candidate]:
        if self.exhausted:
            return None
        constrained = self._constrained_draw()
        return self._new(self._random(constrained), constrained=constrained)

    def report(self, cand_id: int, fitness: Optional[float]) -> Candidate:
        c = self.candidates[cand_id]
        if c in self.history:
            raise ValueError(f"candidate {cand_id} was reported twice")
        c.fitness = None if fitness is None or math.isnan(fitness) else float(fitness)
        self.history.append(c)
        return c

    def best(self) -> Optional[Candidate]:
        done = [c for c in self.history if c.fitness is not None]
        return max(done, key=_key) if done else None


class RegularizedEvolution(RandomSearch):
    """Aging evolution: tournament of S from the population, mutate the winner, the oldest dies."""

    def __init__(self, population_size: int = 20, cycles: int = 50, sample_size: int = 10, **kw):
        super().__init__(population_size, cycles, **kw)
        if not 1 <= sample_size:
            raise ValueError("sample_size must be >= 1")
        self.S = sample_size
        self.population: deque[Candidate] = deque()

    def propose(self) -> Optional[Candidate]:
        if self.exhausted:
            return None
        if self.proposed < self.P:                       # the initial population: random architectures
            constrained = self._constrained_draw()
            return self._new(self._random(constrained), constrained=constrained)
        if not self.population:                          # nothing reported yet to breed from
            return None
        sample = [self.rng.choice(self.population) for _ in range(self.S)]   # with replacement, as Real et al.
        parent = max(sample, key=_key)
        frozen = 1 if parent.constrained else 0
        child = kind = None
        for _ in range(self.max_redraws):               # an architecture trained before is redrawn...
            child, kind = mutate(parent.genotype, self.rng, self.max_depth, frozen=frozen)
            if child.hash() not in self.by_hash:
                return self._new(child, parent=parent.id, mutation=kind, constrained=parent.constrained)
        prior = self.candidates[self.by_hash[child.hash()]]
        if prior.fitness is not None or prior in self.history:   # ...up to a bound: then its result is reused
            c = self._new(child, parent=parent.id, mutation=kind, constrained=parent.constrained,
                          reused_from=prior.id)
            c.fitness = prior.fitness
            return c
        return self._new(self._random(parent.constrained), constrained=parent.constrained)

    def report(self, cand_id: int, fitness: Optional[float]) -> Candidate:
        c = super().report(cand_id, fitness)
        self.population.append(c)
        if len(self.population) > self.P:
            self.population.popleft()                    # the oldest dies, whatever its fitness
        return c


STRATEGIES = {"evolution": RegularizedEvolution, "random": RandomSearch}


def make_strategy(name: str, **kw) -> RandomSearch:
    if name not in STRATEGIES:
        raise ValueError(f"unknown strategy {name!r}; expected one of {sorted(STRATEGIES)}")
    return STRATEGIES[name](**kw)
