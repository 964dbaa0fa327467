"""What a network is built from (saved in a bundle's config.json and in a run's config): the
settings shared by model.py's DAG networks and tfidf.py's baseline, which both import it."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Optional


@dataclass
class ModelConfig:
    """Everything needed to rebuild a model (saved in a bundle's config.json)."""
    kind: str = "dag"                     # "dag" | "tfidf-mlp"
    genotype: Optional[dict] = None       # Genotype.to_dict() for kind "dag"
    emb_dim: int = 300
    width: int = 512                      # D: every node's output width
    fc: list = field(default_factory=lambda: [256])
    dropout_emb: float = 0.2
    dropout: float = 0.5
    freeze_emb: bool = False
    shortlist: int = 0                    # K: labels scored per document, from the lexical stage's
                                          # shortlist (docs/design.md "Extreme label spaces"); 0: every label
    # tfidf-mlp only
    hidden: list = field(default_factory=lambda: [512, 256])
    max_features: int = 60000

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        return cls(**known)
