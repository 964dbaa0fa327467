"""A trained model as a directory: save, load, predict.

    config.json   model and training configuration, data settings, format version
    weights.pt    the state_dict, loaded with torch.load(weights_only=True): never runs pickled code
    vocab.json    the vocabulary
    labels.json   label names, in score order
    metrics.json  the result record of its training (validation and test metrics, ...)
    lexical/      optional: the lexical stage (lexical.json lists its files with their SHA-256), fused
                  with the network as config.json's "lexical" "fusion" says; a bundle of the lexical
                  stage alone has no network ("model": null, no weights.pt). A shortlisted network
                  (config.json's "model" "shortlist": K > 0) always has it: its tree (or label
                  centroids) gives each text's K candidate labels, the only ones the network scores
    members/N/    optional: an ensemble's other networks (model.json, weights.pt), their probabilities
                  averaged with the first's (config.json's "ensemble" lists them; ensemble.py)

Written to a temporary sibling directory and renamed into place, so a crash
never leaves a half-written bundle under the final name.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import scipy.sparse as sp
import torch

from . import __version__
from .model import ModelConfig, build_model
from .runs import public_mode

#: the bundle layout; load_bundle reads this one and, through migrate_bundle_config, the older ones.
#: 2: "train" holds no device/threads (where it trained is no setting) and "precision", never "amp".
#: 3: an ensemble's members (format 2 readers would serve its first network alone).
FORMAT = 3


#: data settings a bundle records, so that `evaluate` reads its data as training did
DATA_SETTINGS = ("max_len", "min_count", "max_vocab", "valid", "seed", "text_column", "labels_column")


def _write_json(path, obj):
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, ensure_ascii=False)
        f.write("\n")


def save_bundle(out_dir: str, model: Optional[torch.nn.Module], model_cfg: Optional[ModelConfig], data, *,
                train_cfg: Optional[dict] = None, record: Optional[dict] = None,
                state: Optional[dict] = None, lexical: Optional[str] = None, fusion=None,
                members: Sequence[tuple] = ()) -> str:
    """Save `model` (or `state`, a state_dict) with what predicting from raw text needs; with `lexical`
    (a lexical stage folder), a copy of the stage and the `fusion` of the two (model None: the stage alone);
    with `members` ((ModelConfig, module) pairs), an ensemble of `model` and those networks."""
    if model_cfg is not None and model_cfg.shortlist and lexical is None:
        raise ValueError("a shortlisted network's bundle needs the lexical stage whose tree gives its shortlists")
    out_dir = os.path.abspath(out_dir)
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tmp-bundle-", dir=parent)
    try:
        public_mode(tmp, directory=True)
        config = {
            "format": FORMAT, "xmcnas_fast": __version__,
            "model": model_cfg.to_dict() if model_cfg is not None else None,
            "train": train_cfg,
            "num_labels": data.num_labels, "vocab_size": len(data.vocab),
            "data": {"name": data.name, "location": data.source.get("location"), "max_len": data.max_len,
                     "settings": {k: v for k, v in (data.source.get("settings") or {}).items()
                                  if k in DATA_SETTINGS}},
        }
        if lexical is not None:
            shutil.copytree(lexical, os.path.join(tmp, "lexical"), copy_function=_link_or_copy)
            config["lexical"] = {"fusion": fusion.to_dict() if fusion is not None else None}
        if members:
            config["ensemble"] = {"members": [f"members/{i}" for i in range(1, len(members) + 1)]}
            for i, (cfg_i, net) in enumerate(members, start=1):
                folder = os.path.join(tmp, "members", str(i))
                os.makedirs(folder)
                _write_json(os.path.join(folder, "model.json"), cfg_i.to_dict())
                torch.save(_host_state(net), os.path.join(folder, "weights.pt"))
        _write_json(os.path.join(tmp, "config.json"), config)
        if model_cfg is not None:
            sd = state if state is not None else _host_state(model)
            torch.save(sd, os.path.join(tmp, "weights.pt"))
        data.vocab.save(os.path.join(tmp, "vocab.json"))
        _write_json(os.path.join(tmp, "labels.json"), list(data.label_names))
        _write_json(os.path.join(tmp, "metrics.json"), record or {})
        if os.path.exists(out_dir):
            old = out_dir + ".old"
            shutil.rmtree(old, ignore_errors=True)
            os.replace(out_dir, old)
            os.replace(tmp, out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def _host_state(model: torch.nn.Module) -> dict:
    return {k: v.detach().cpu() for k, v in model.state_dict().items()}


def _link_or_copy(src: str, dst: str) -> None:
    """A hard link where the file system allows one (the stage's files are never written in place, so
    bundles of one search share them), else a copy."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


@dataclass
class Bundle:
    model: Optional[torch.nn.Module]     # None: the lexical stage alone
    config: dict
    vocab: object
    label_names: list
    metrics: dict
    device: torch.device
    lexical: object = None               # a LexicalStage, on the host
    fusion: object = None                # the Fusion of network and lexical stage

    @property
    def shortlist(self) -> int:
        """K: the labels its network scores per text, from the lexical stage's candidate model (0: every
        label)."""
        return int(getattr(self.model, "shortlist", 0) or 0)

    def fused(self, logits: torch.Tensor, lex_ids, lex_probs, slots: Optional[torch.Tensor] = None):
        """Probabilities [b, L] on the bundle's device: the network's or the fused model's, whichever the
        bundle holds (lex_ids/lex_probs: host arrays of the batch's top lists).
        With `slots` (a shortlisted network's label ids [b, K]), the probabilities [b, K] of those labels
        (-1 at padding)."""
        if slots is not None:
            from .lexical.shortlist import slot_lexical

            z = logits.float()
            p = torch.sigmoid(z) if self.fusion is None else self.fusion.fuse(z, *slot_lexical(lex_ids, lex_probs, slots))
            return p.masked_fill(slots < 0, -1.0)
        if self.lexical is None:
            return torch.sigmoid(logits.float())
        return self.fusion(logits, torch.as_tensor(lex_ids).to(self.device), torch.as_tensor(lex_probs).to(self.device))

    @property
    def max_len(self) -> int:
        return self.config["data"].get("max_len") or 10**9

    @property
    def precision(self) -> str:
        """The precision it was trained and evaluated in (train.TrainConfig.precision); predictions use it too."""
        from .train import TrainConfig

        return TrainConfig.from_dict(self.config.get("train") or {}).precision

    def encode(self, texts: Sequence[str]):
        """Raw texts -> a TextDataset (no labels) with the training tokenizer, vocabulary and max_len."""
        from .data import TextDataset, tokenize

        ids = [self.vocab.encode(tokenize(t))[: self.max_len] for t in texts]
        ids = [a if len(a) else np.array([1], dtype=np.int32) for a in ids]  # empty text -> <unk>
        offsets = np.zeros(len(ids) + 1, dtype=np.int64)
        offsets[1:] = np.cumsum([len(a) for a in ids])
        flat = np.concatenate(ids).astype(np.int32) if ids else np.zeros(0, dtype=np.int32)
        labels = sp.csr_matrix((len(ids), len(self.label_names)), dtype=np.float32)
        return TextDataset(token_ids=flat, offsets=offsets, labels=labels, ids=None)

    @torch.no_grad()
    def _scored_batches(self, texts: Sequence[str], batch_size: int):
        """(row indices, probabilities on the device, label ids) for each batch of texts: probabilities
        [b, L] and ids None, or for a shortlisted network [b, K] and the shortlist's ids [b, K] (for the
        lexical stage alone, its top lists)."""
        from .data import iterate_batches
        from .train import autocast

        if self.model is None:                 # the stage's top lists: ranked within them, whatever L
            for s in range(0, len(texts), batch_size):
                ids, probs = self.lexical.topk(texts[s:s + batch_size])
                slots = torch.from_numpy(ids).to(self.device)
                p = torch.from_numpy(probs).to(self.device).masked_fill(slots < 0, -1.0)
                yield np.arange(s, s + len(ids)), p, slots
            return
        self.model.eval()
        precision, K = self.precision, self.shortlist
        for b in iterate_batches(self.encode(texts), len(self.label_names), batch_size, shuffle=False,
                                 dense_labels=False):
            rows = b.index.numpy()
            b = b.to(self.device)
            lex, slots = (None, None), None
            if self.lexical is not None:
                top_k = self.lexical.settings.top_k
                ids, probs = self.lexical.topk([texts[i] for i in rows], max(top_k, K))
                lex = (ids[:, :top_k], probs[:, :top_k])
                slots = torch.from_numpy(ids[:, :K]).to(self.device) if K else None
            with autocast(self.device, precision):
                scores = self.model(b.tokens, b.mask) if slots is None else self.model(b.tokens, b.mask, slots)
            yield rows, self.fused(scores, *lex, slots), slots

    def predict_scores(self, texts: Sequence[str], batch_size: int = 256) -> np.ndarray:
        """Probabilities [len(texts), L] (sigmoid of the scores; a shortlisted network's are 0 outside
        each text's shortlist)."""
        out = np.zeros((len(texts), len(self.label_names)), dtype=np.float32)
        for rows, p, slots in self._scored_batches(texts, batch_size):
            if slots is None:
                out[rows] = p.cpu().numpy()
                continue
            ids, p = slots.cpu().numpy(), p.float().cpu().numpy()
            keep = ids >= 0
            out[np.repeat(rows, keep.sum(1)), ids[keep]] = p[keep]
        return out

    def aligned_test(self, data) -> tuple:
        """`data`'s test split re-expressed in this bundle's vocabulary and label order (by word and
        by label name; labels the bundle does not know get columns after its own), and the inverse
        propensities of those columns (from `data`'s train + valid counts)."""
        from .data import TextDataset
        from .train import label_inv_propensity

        test = data.test
        word_map = np.array([self.vocab.stoi.get(w, 1) for w in data.vocab.itos], dtype=np.int32)
        word_map[0] = 0
        own = {n: i for i, n in enumerate(self.label_names)}
        names = list(data.label_names) + list(data.unseen_label_names)
        extra: dict = {}
        col_map = np.array([own[n] if n in own else len(own) + extra.setdefault(n, len(extra)) for n in names],
                           dtype=np.int64)
        columns = len(own) + len(extra)
        lab = test.labels.tocoo()
        labels = sp.csr_matrix((lab.data, (lab.row, col_map[lab.col])), shape=(len(test), columns))
        inv_prop = label_inv_propensity(data, len(names))
        aligned_prop = np.full(columns, float(np.max(inv_prop)) if len(inv_prop) else 1.0)
        aligned_prop[col_map] = inv_prop
        aligned = TextDataset(token_ids=word_map[test.token_ids], offsets=test.offsets, labels=labels, ids=test.ids)
        return aligned, aligned_prop

    def lexical_lists(self, data, k: Optional[int] = None) -> tuple:
        """The lexical stage's top lists (of `k` labels; default its own top_k) of `data`'s test split,
        from its texts uncut, in the stage's vocabulary; label ids in this bundle's order."""
        from .lexical import stage_data

        full = stage_data(data)
        words = np.array([self.lexical.vocab.stoi.get(w, 1) for w in full.vocab.itos], dtype=np.int64)
        words[0] = 0
        return self.lexical.topk_tokens(words[full.test.token_ids], full.test.offsets, k)

    def predict(self, texts: Sequence[str], k: int = 5, batch_size: int = 256) -> list:
        """Top-k labels of each text: [[(label, probability), ...], ...], best first."""
        k = min(k, len(self.label_names))
        result: list = [None] * len(texts)
        for rows, p, slots in self._scored_batches(texts, batch_size):
            top = torch.topk(p, min(k, p.shape[1]), dim=1)
            idx = top.indices if slots is None else slots.gather(1, top.indices)
            for row, vals, ids in zip(rows.tolist(), top.values.cpu().tolist(), idx.cpu().tolist()):
                result[row] = [(self.label_names[i], v) for i, v in zip(ids, vals) if i >= 0]
        return result


def find_bundle(path: str) -> str:
    """The bundle directory `path` names: itself, or, for a search run, the run's best model."""
    from .runs import Run

    if os.path.isfile(os.path.join(path, "weights.pt")) or not os.path.isfile(os.path.join(path, "config.json")):
        return path
    config = read_json_file(os.path.join(path, "config.json"))
    if "search" not in config:
        return path
    best = Run(path, config).best()
    if not best or not best.get("model_dir"):
        raise ValueError(f"{path} is a search run with no saved model yet: resume it, or pass a bundle "
                         f"(a directory with weights.pt)")
    return best["model_dir"]


def read_json_file(p: str):
    """A JSON file of a bundle; ValueError naming the file when it is missing or malformed."""
    try:
        with open(p, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise ValueError(f"{p}: missing — is {os.path.dirname(p)} a model bundle?") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{p}:{e.lineno}: invalid JSON ({e.msg})") from None


def migrate_bundle_config(config: dict, where: str = "config.json") -> dict:
    """A bundle's config.json in the present layout (FORMAT); ValueError (naming `where`) for a
    format this code does not know. Format 1 -> 2: train's "device" and "threads" dropped, "amp":
    false read as "precision": "fp32". 2 -> 3: nothing to change (3 may hold an ensemble)."""
    version = config.get("format")
    if not isinstance(version, int) or not 1 <= version <= FORMAT:
        raise ValueError(f"{where}: bundle format {version!r} is not one this xmcnas-fast reads (1 to {FORMAT}; "
                         f"written by xmcnas-fast {config.get('xmcnas_fast')})")
    config = dict(config)
    if version < 2 and isinstance(config.get("train"), dict):
        train = dict(config["train"])
        if "precision" not in train and train.get("amp") is False:
            train["precision"] = "fp32"
        for gone in ("amp", "device", "threads"):
            train.pop(gone, None)
        config["train"] = train
    config["format"] = FORMAT
    return config


def load_bundle(path: str, device: str = "cpu", use_kernels: bool = True) -> Bundle:
    """Load a bundle on CPU or CUDA. Raises ValueError naming the file on a malformed bundle."""
    from .data import Vocab

    def read(name):
        return read_json_file(os.path.join(path, name))

    config = read("config.json")
    if "format" not in config:
        hint = " (a search run: pass its best model, models/cand-N, or the run itself to predict)" \
            if "search" in config else ""
        raise ValueError(f"{path} is not a model bundle: its config.json has no bundle format{hint}")
    config = migrate_bundle_config(config, os.path.join(path, "config.json"))
    labels = read("labels.json")
    metrics = read("metrics.json") if os.path.exists(os.path.join(path, "metrics.json")) else {}
    vocab = Vocab.load(os.path.join(path, "vocab.json"))
    dev = torch.device(device)
    lexical, fusion = load_lexical_part(path, config, len(labels))
    model = None
    if config.get("model") is not None:
        model = _load_network(path, config, config["model"], "weights.pt", use_kernels)
        if config.get("ensemble"):
            from .ensemble import Ensemble

            members = [model]
            for sub in config["ensemble"].get("members") or []:
                cfg_i = read(os.path.join(sub, "model.json"))
                members.append(_load_network(path, config, cfg_i, os.path.join(sub, "weights.pt"), use_kernels))
            model = Ensemble(members)
        model.to(dev).eval()
    elif lexical is None:
        raise ValueError(f"{os.path.join(path, 'config.json')}: a bundle with neither a network nor a lexical part")
    return Bundle(model, config, vocab, labels, metrics, dev, lexical, fusion)


def _load_network(path: str, config: dict, model_cfg: dict, weights: str, use_kernels: bool) -> torch.nn.Module:
    """One network of a bundle, on the host; ValueError naming the file when its weights are missing."""
    model = build_model(ModelConfig.from_dict(model_cfg), config["vocab_size"], config["num_labels"],
                        use_kernels=use_kernels)
    p = os.path.join(path, weights)
    if not os.path.isfile(p):
        raise ValueError(f"{p}: missing — is {path} a whole model bundle?")
    model.load_state_dict(torch.load(p, map_location="cpu", weights_only=True))
    return model


def load_lexical_part(path: str, config: dict, num_labels: int) -> tuple:
    """(LexicalStage, Fusion) of a bundle that has a lexical part, else (None, None); ValueError naming
    the file when the part is missing or corrupt."""
    from .lexical import Fusion, LexicalStage

    part = config.get("lexical")
    if part is None:
        return None, None
    folder = os.path.join(path, "lexical")
    if not os.path.isdir(folder):
        raise ValueError(f"{folder}: missing — {os.path.join(path, 'config.json')} names a lexical part")
    stage = LexicalStage.load(folder)
    if stage.num_labels != num_labels:
        raise ValueError(f"{os.path.join(folder, 'lexical.json')}: {stage.num_labels} labels, the bundle has {num_labels}")
    try:
        fusion = Fusion.from_dict(part["fusion"]) if part.get("fusion") else None
    except (TypeError, ValueError) as e:
        raise ValueError(f"{os.path.join(path, 'config.json')}: lexical fusion: {e}") from None
    return stage, fusion
