"""Regularized evolution (Real et al. 2019) and random search, as pure logic.

No torch, no files: a strategy proposes architectures and is told their
fitness (fitness.fitness: validation P@5). The interface is asynchronous so that W
workers keep W candidates in flight: `propose()` gives the next candidate to train
(or None when none can be proposed yet), `tell(id, fitness)` takes a finished one.
With one worker, propose and tell alternate and the loop is exactly Real et
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

from .fitness import rank_key
from .space import DEFAULT_MAX_DEPTH, Genotype, mutate, random_genotype


@dataclass
class Candidate:
    id: int
    genotype: Genotype
    parent: Optional[int] = None          # None: drawn at random
    mutation: Optional[str] = None        # "input" | "operation" | "add"
    constrained: bool = False             # node 1 fixed by the constraint (kept by its children)
    fitness: Optional[float] = None       # fitness.fitness of its result; None until told (or a failed run)
    reused_from: Optional[int] = None     # an identical network trained before: its result is reused
    stands_in_for: Optional[int] = None   # drawn at random for this parent: its mutations were all in flight
    rung: int = 0                         # the budget `fitness` comes from: 0 the short one, 1 the full one
    short_fitness: Optional[float] = None  # validation P@5 at the short budget (short runs first only)
    tie: Optional[float] = None           # the figure that breaks a tie of `fitness` (fitness.record_tie, rank_key)


def _key(c: Candidate) -> tuple:
    """How candidates rank: fitness.rank_key, the one order of the search."""
    return rank_key(c.rung, c.fitness, c.tie)


def _finite(x: Optional[float]) -> Optional[float]:
    return None if x is None or math.isnan(x) else float(x)


class Strategy:
    """What every strategy shares: the budget of P + C candidates, the seeded generator, the record
    of every candidate (by id and by network), the history of results told, random draws without repeats."""

    def __init__(self, population_size: int = 20, cycles: int = 50, *, max_depth: int = DEFAULT_MAX_DEPTH,
                 seed: int = 0, constraint: Optional[tuple] = None, constraint_fraction: float = 0.0,
                 max_redraws: int = 100):
        if population_size < 1 or cycles < 0:
            raise ValueError(f"population ({population_size}) must be >= 1 and cycles ({cycles}) >= 0")
        self.P, self.C, self.max_depth = population_size, cycles, max_depth
        self.rng = random.Random(seed)
        self.constraint, self.constraint_fraction = constraint, constraint_fraction
        self.max_redraws = max_redraws
        self.candidates: dict[int, Candidate] = {}
        self.by_hash: dict[str, int] = {}          # canonical hash -> first candidate with it
        self.history: list[Candidate] = []         # told, in the order told
        self.told: set[int] = set()
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

    @property
    def population(self) -> list[Candidate]:
        """The candidates the strategy currently draws on (shown as the search's population)."""
        return self.history

    @property
    def parents(self) -> list[Candidate]:
        """The candidates a later proposal may be a child of (with weight inheritance their bundles
        are kept): none here, every draw is random."""
        return []

    def propose(self) -> Optional[Candidate]:
        raise NotImplementedError

    def tell(self, cand_id: int, fitness: Optional[float], *, rung: int = 0,
             short_fitness: Optional[float] = None, tie: Optional[float] = None) -> Candidate:
        """A finished candidate: its fitness at budget `rung` (1: it went on to the full budget after
        its short run), its figure at the short budget when it had one, and the figure that breaks a
        tie of fitness (`fitness.rank_key`)."""
        if cand_id in self.told:
            raise ValueError(f"candidate {cand_id} was told twice")
        c = self.candidates[cand_id]
        c.fitness, c.rung, c.short_fitness = _finite(fitness), int(rung), _finite(short_fitness)
        c.tie = _finite(tie)
        self.told.add(cand_id)
        self.history.append(c)
        return c

    def promotion_threshold(self, fraction: float) -> float:
        """The short-budget figure a new candidate must reach to go on to the full budget: that of the
        population's ceil(n * fraction)-th best at the short budget (-inf while none has one)."""
        figures = sorted((c.short_fitness for c in self.population if c.short_fitness is not None), reverse=True)
        if not figures:
            return -math.inf
        return figures[max(1, math.ceil(len(figures) * fraction)) - 1]

    def best(self) -> Optional[Candidate]:
        done = [c for c in self.history if c.fitness is not None]
        return max(done, key=_key) if done else None

    # ---- drawing candidates ----------------------------------------------------------------------
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

    def _random_candidate(self) -> Candidate:
        """A new architecture drawn at random, constrained for the configured fraction of draws."""
        constrained = self.constraint is not None and self.rng.random() < self.constraint_fraction
        return self._new(self._random(constrained), constrained=constrained)


class RandomSearch(Strategy):
    """The ablation: the same budget of P + C architectures, all drawn at random (no duplicates)."""

    def propose(self) -> Optional[Candidate]:
        return None if self.exhausted else self._random_candidate()


class RegularizedEvolution(Strategy):
    """Aging evolution: tournament of S from the population, mutate the winner, the oldest dies."""

    def __init__(self, population_size: int = 20, cycles: int = 50, sample_size: int = 10, **kw):
        super().__init__(population_size, cycles, **kw)
        if not 1 <= sample_size <= population_size:
            raise ValueError(f"sample size ({sample_size}) must be between 1 and the population "
                             f"({population_size})")
        self.S = sample_size
        self._population: deque[Candidate] = deque()

    @property
    def population(self) -> deque[Candidate]:
        return self._population

    @property
    def parents(self) -> list[Candidate]:
        """The population: every tournament draws from it."""
        return list(self._population)

    def propose(self) -> Optional[Candidate]:
        if self.exhausted:
            return None
        if self.proposed < self.P:                       # the initial population: random architectures
            return self._random_candidate()
        if not self.population:                          # no result told yet to breed from
            return None
        sample = [self.rng.choice(self.population) for _ in range(self.S)]   # with replacement, as Real et al.
        parent = max(sample, key=_key)
        return self._child_of(parent)

    def tell(self, cand_id: int, fitness: Optional[float], **kw) -> Candidate:
        c = super().tell(cand_id, fitness, **kw)
        self.population.append(c)
        if len(self.population) > self.P:
            self.population.popleft()                    # the oldest dies, whatever its fitness
        return c

    def _child_of(self, parent: Candidate) -> Candidate:
        """A mutation of `parent` never seen before, redrawn up to a bound; past it, the network it
        keeps giving is reused if trained, or replaced by a random draw if still in flight."""
        child = kind = None
        for _ in range(self.max_redraws):
            child, kind = mutate(parent.genotype, self.rng, self.max_depth, frozen=int(parent.constrained))
            if child.hash() not in self.by_hash:
                return self._new(child, parent=parent.id, mutation=kind, constrained=parent.constrained)
        prior = self.candidates[self.by_hash[child.hash()]]
        if prior.id in self.told:
            return self._reuse(prior, child, parent, kind)
        return self._stand_in(parent)

    def _reuse(self, prior: Candidate, child: Genotype, parent: Candidate, kind: str) -> Candidate:
        """The child is a network trained before: it takes that result instead of training again."""
        c = self._new(child, parent=parent.id, mutation=kind, constrained=parent.constrained,
                      reused_from=prior.id)
        c.fitness, c.rung, c.short_fitness = prior.fitness, prior.rung, prior.short_fitness
        return c

    def _stand_in(self, parent: Candidate) -> Candidate:
        """A random draw in place of the child of `parent`, recorded as standing in for it."""
        return self._new(self._random(parent.constrained), constrained=parent.constrained,
                         stands_in_for=parent.id)


STRATEGIES = {"evolution": RegularizedEvolution, "random": RandomSearch}


def make_strategy(name: str, **kw) -> Strategy:
    if name not in STRATEGIES:
        raise ValueError(f"unknown strategy {name!r}; expected one of {sorted(STRATEGIES)}")
    return STRATEGIES[name](**kw)
