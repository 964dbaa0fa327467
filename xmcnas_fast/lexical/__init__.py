"""The lexical stage (TF-IDF n-grams and a label tree, napkinXC's PLT, or label centroids) and its
fusion with a network's scores: see docs/design.md, "The lexical stage and fusion"."""
from .centroids import LabelCentroids
from .features import FeatureSettings, NgramTfidf
from .fusion import Fusion, choose_fusion, dense_lexical
from .stage import (LexicalSettings, LexicalStage, cached_stage, fit_stage, lexical_split_metrics, stage_data,
                    verify)
from .tree import LabelTree, TreeSettings

__all__ = ["FeatureSettings", "Fusion", "LabelCentroids", "LabelTree", "LexicalSettings", "LexicalStage", "NgramTfidf",
           "TreeSettings", "cached_stage", "choose_fusion", "dense_lexical", "fit_stage", "lexical_split_metrics",
           "stage_data", "verify"]
