"""A search's directory.

    runs/NAME/
      config.json       everything needed to reproduce the search (written once, atomically; an older
                        layout is brought up to date in memory on open: config.migrate)
      proposals.jsonl   one line per candidate proposed, in order (what resume replays)
      history.jsonl     one line per finished candidate: genotype, hash, status, metrics, weights, ...
                        and model_dir while its bundle is kept
      models/cand-N/    model bundles of the best candidates (the others are deleted; with weight
                        inheritance, those of the population too: they may become parents)
      models/final/     the best architecture trained to the end (the search's result)
      final.json        its record: which candidate it trains, its settings and metrics
      models/ensemble/  the result as an ensemble of the run's networks, when one gained on validation
      ensemble.json     what the ensemble step tried and chose (ensemble.py)
      closed.json       when the search's time ran out before its budget of candidates (if it did)
      best.json         the search's result: the ensemble if one was kept, else the final model if it
                        did at least as well as the best candidate, else that one
      .lock             exists while a search runs in the directory

Lines are appended, flushed and fsynced one at a time, so a kill -9 at any
moment loses at most the line being written; a torn last line is dropped
when the run is opened again. When a bundle is deleted, history.jsonl is
rewritten without its model_dir, atomically (a new file renamed over the
old). Only the search's main process writes here (workers write their
bundles under models/, atomically).
"""
from __future__ import annotations

import fcntl
import json
import os
import shutil
import tempfile
from typing import Optional


class RunError(Exception):
    """A run directory that cannot be used as asked (exists, missing, locked, corrupt)."""


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def public_mode(path: str, directory: bool = False) -> None:
    """Give a file made by mkstemp/mkdtemp (0600/0700) the mode a plain open() would: 0666 (0777) less the umask."""
    os.chmod(path, (0o777 if directory else 0o666) & ~_umask())


def write_atomic(path: str, write) -> None:
    """Write a file through `write(f)` into a temporary sibling, fsync it and rename it into place."""
    d = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=d)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        public_mode(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_json_atomic(path: str, obj) -> None:
    write_atomic(path, lambda f: f.write(json.dumps(obj, indent=2) + "\n"))


def _line(record: dict) -> str:
    return json.dumps(record, separators=(",", ":"), allow_nan=False) + "\n"


class JsonLog:
    """A JSON-lines file that survives being killed mid-write: lines are appended one at a time;
    `rewrite` replaces the whole file atomically (the only change to lines already written)."""

    def __init__(self, path: str):
        self.path = path
        self.records = self._read_and_repair()

    def _read_and_repair(self) -> list:
        if not os.path.exists(self.path):
            return []
        with open(self.path, "rb") as f:
            data = f.read()
        keep = data if data.endswith(b"\n") or not data else data[: data.rfind(b"\n") + 1]
        if len(keep) != len(data):  # a torn last line from a crash: drop it
            with open(self.path, "r+b") as f:
                f.truncate(len(keep))
        out = []
        for n, line in enumerate(keep.decode("utf-8").splitlines(), start=1):
            if line.strip():
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise RunError(f"{self.path}:{n}: corrupt record ({e.msg})") from None
        return out

    def append(self, record: dict) -> None:
        line = _line(record)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())
        self.records.append(record)

    def rewrite(self) -> None:
        """Write the records (changed in place) anew, atomically: the old file or the new one, never a mix."""
        write_atomic(self.path, lambda f: f.writelines(_line(r) for r in self.records))


class Run:
    def __init__(self, path: str, config: dict):
        self.path = os.path.abspath(path)
        self.config = config
        self.proposals = JsonLog(os.path.join(self.path, "proposals.jsonl"))
        self.history = JsonLog(os.path.join(self.path, "history.jsonl"))
        self.models_dir = os.path.join(self.path, "models")
        os.makedirs(self.models_dir, exist_ok=True)
        self._lock = None

    # ---- creating and opening ------------------------------------------------------------------
    @classmethod
    def create(cls, path: str, config: dict) -> "Run":
        """A new run directory. One that holds a search which never proposed a candidate (it stopped
        before its first) is taken over; one whose search started is refused."""
        cls.check_free(path)
        os.makedirs(path, exist_ok=True)
        write_json_atomic(os.path.join(path, "config.json"), config)
        return cls(path, config)

    @classmethod
    def check_free(cls, path: str) -> None:
        """RunError unless a new search may be created at `path` (see create)."""
        if os.path.exists(os.path.join(path, "config.json")) and cls.open(path).started():
            raise RunError(f"{path} already holds a search: resume it with --resume {path}, "
                           f"or choose another --name")

    @classmethod
    def open(cls, path: str) -> "Run":
        cfg_path = os.path.join(path, "config.json")
        try:
            with open(cfg_path, encoding="utf-8") as f:
                config = json.load(f)
        except FileNotFoundError:
            raise RunError(f"{path} is not a search directory (no config.json)") from None
        except json.JSONDecodeError as e:
            raise RunError(f"{cfg_path}:{e.lineno}: invalid JSON ({e.msg})") from None
        from .config import migrate   # (the config's layout is the search's business, not the directory's)

        try:
            return cls(path, migrate(config))
        except ValueError as e:
            raise RunError(f"{cfg_path}: {e}") from None

    def started(self) -> bool:
        """Whether a search has proposed a candidate here, or runs here now."""
        return bool(self.proposals.records or self.history.records) or self._locked_elsewhere()

    def _locked_elsewhere(self) -> bool:
        try:
            self.lock()
        except RunError:
            return True
        self.unlock()
        return False

    def lock(self) -> "Run":
        """Hold the directory for this process: a second search in it is refused. The file is removed
        on unlock, so a lock taken on a file that was removed meanwhile is taken again on the new one."""
        path = os.path.join(self.path, ".lock")
        while True:
            f = open(path, "a+")
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                f.close()
                raise RunError(f"{self.path} is in use by another running search") from None
            try:
                same = os.stat(path).st_ino == os.fstat(f.fileno()).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            f.close()
        f.seek(0)
        f.truncate()
        f.write(str(os.getpid()))
        f.flush()
        self._lock = f
        return self

    def unlock(self) -> None:
        if self._lock is not None:
            try:
                os.unlink(os.path.join(self.path, ".lock"))  # still held: no other process owns this file
            except FileNotFoundError:
                pass
            self._lock.close()
            self._lock = None

    # ---- state ---------------------------------------------------------------------------------
    def finished_ids(self) -> set:
        return {r["id"] for r in self.history.records}

    def unfinished_proposals(self) -> list:
        done = self.finished_ids()
        return [p for p in self.proposals.records if p["id"] not in done]

    def model_dir(self, cand_id: int) -> str:
        return os.path.join(self.models_dir, f"cand-{cand_id}")

    def final_dir(self) -> str:
        return os.path.join(self.models_dir, "final")

    def _read(self, name: str) -> Optional[dict]:
        p = os.path.join(self.path, name)
        if not os.path.exists(p):
            return None
        with open(p, encoding="utf-8") as f:
            return json.load(f)

    def search_closed(self) -> Optional[dict]:
        """When the search's time ran out before its budget of candidates ({"at": seconds, "candidates":
        n}), or None: kept so that a resumed search stays closed whatever finished after."""
        return self._read("closed.json")

    def close_search(self, record: dict) -> None:
        write_json_atomic(os.path.join(self.path, "closed.json"), record)

    def final(self) -> Optional[dict]:
        """The record of the final training (None until it has finished)."""
        return self._read("final.json")

    def set_final(self, record: dict) -> None:
        write_json_atomic(os.path.join(self.path, "final.json"), record)

    def ensemble(self) -> Optional[dict]:
        """The record of the ensemble step (None until it has run)."""
        return self._read("ensemble.json")

    def set_ensemble(self, record: dict) -> None:
        write_json_atomic(os.path.join(self.path, "ensemble.json"), record)

    def best(self) -> Optional[dict]:
        return self._read("best.json")

    def lexical(self) -> Optional[dict]:
        """The search's lexical stage: its folder, the seconds it took and its own metrics (None: off)."""
        return self._read("lexical.json")

    def set_lexical(self, record: dict) -> None:
        write_json_atomic(os.path.join(self.path, "lexical.json"), record)

    def keep_models(self, ids: set) -> list:
        """Delete the bundles of candidates not in `ids`, and the `model_dir` of their records in the
        history, so that no record points to a deleted bundle; returns the ids of the records changed.
        Anything else under models/ may be a bundle a worker is writing now: it is left alone
        (remove_stray_files clears it at the start)."""
        for name in os.listdir(self.models_dir):
            full = os.path.join(self.models_dir, name)
            if name.startswith("cand-") and name[5:].isdigit() and int(name[5:]) not in ids and os.path.isdir(full):
                shutil.rmtree(full, ignore_errors=True)
        stale = [r for r in self.history.records if r.get("model_dir") and r.get("id") not in ids]
        for r in stale:
            del r["model_dir"]
        if stale:
            self.history.rewrite()
        return [r["id"] for r in stale]

    def remove_stray_files(self) -> None:
        """Half-written bundles (temporary directories) left by a search that was killed; call it
        before any worker starts."""
        for name in os.listdir(self.models_dir):
            full = os.path.join(self.models_dir, name)
            bundle = name in ("final", "ensemble") or (name.startswith("cand-") and name[5:].isdigit())
            if not bundle and os.path.isdir(full):
                shutil.rmtree(full, ignore_errors=True)

    def set_best(self, record: dict) -> None:
        write_json_atomic(os.path.join(self.path, "best.json"),
                          {"id": record["id"], "fitness": record.get("fitness"),
                           "genotype": record["genotype"], "model_dir": record.get("model_dir")})
