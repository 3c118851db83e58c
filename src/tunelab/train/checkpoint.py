"""Atomic, verified, resumable checkpoints: runs/<name>/checkpoints/step-N/.

Writes, per checkpoint:
  weights.safetensors      every trainable tensor (the adapter, or the whole model for full)
  optimizer.safetensors    optimizer state tensors;  optimizer.json  its param groups
  rng.json                 python, numpy and torch (CPU and CUDA) generator states
  state.json               step, data position (epoch, index into the shuffled order), tokens,
                           best-validation bookkeeping, log position, train time
  manifest.json            size and sha256 of every file above
  COMPLETE                 written last
Protocol: files go to a temporary sibling folder and are fsynced; the manifest is written and
fsynced; the folder is renamed to step-N; COMPLETE is written and fsynced last. Older checkpoints
are pruned (newest `keep_last` plus the best) only after the new one is complete, so the last good
checkpoint always survives a crash. Resuming takes the newest checkpoint that has COMPLETE and whose
every file matches the manifest; a damaged one is reported and skipped, never loaded.
Only our own files are read, and no pickle: safetensors and JSON.

Sharded checkpoints (train.distributed: fsdp under torchrun, see save_sharded_checkpoint) keep the
same folder, manifest and COMPLETE rule, with other files:
  dcp/                     model and optimizer state in torch.distributed.checkpoint's format: one
                           __R_0.distcp per rank (that rank's shards) and .metadata (rank 0)
  rng-R.json               each rank's generator states
  state.json, manifest.json (lists every file above, written by rank 0), COMPLETE
The DCP files hold pickled metadata (torch's format): they are read only after every file matched
the manifest's sha256, and only from our own run folder.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from tunelab.errors import TunelabError
from tunelab.files import fsync_dir, fsync_file, sha256_file

PREFIX = "step-"
COMPLETE = "COMPLETE"
MANIFEST = "manifest.json"
_TMP_PREFIX = ".tmp-"
_FORMAT = 1
SHARDED = "sharded"  # manifest "kind" of an FSDP checkpoint; a missing kind is a single-file one
DCP_DIR = "dcp"


@dataclass
class TrainState:
    """Where the loop is. Saved in every checkpoint and restored on resume."""

    step: int = 0  # optimizer steps completed
    epoch: int = 0  # data position of the next step: epoch ...
    position: int = 0  # ... and index of its first row in that epoch's shuffled order
    tokens: int = 0  # real (non-pad) tokens trained on so far
    trainable_tokens: int = 0
    best_val_loss: float | None = None
    best_step: int | None = None
    evals_without_improvement: int = 0
    last_val_loss: float | None = None  # previous evaluation, to detect overfitting
    last_train_loss: float | None = None
    nonfinite_streak: int = 0
    stopped_early: bool = False
    log_offset: int = 0  # bytes of train/log.jsonl that belong to steps <= step
    train_time_s: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class Checkpoint:
    path: Path
    step: int
    weights: dict[str, torch.Tensor]
    optimizer_state: dict[str, Any]
    rng: dict[str, Any]
    state: TrainState
    sharded: bool = False  # weights and optimizer state are in DCP_DIR, not loaded here
    world_size: int = 1  # processes that wrote a sharded checkpoint


# ----------------------------------------------------------------------------------------------
# RNG


def capture_rng() -> dict[str, Any]:
    """Every generator the loop's randomness can come from (dropout uses torch's)."""
    version, mt_state, gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    rng: dict[str, Any] = {
        "python": [version, list(mt_state), gauss],
        "numpy": [np_name, np_keys.tolist(), int(np_pos), int(np_has_gauss), float(np_gauss)],
        "torch": torch.get_rng_state().tolist(),
    }
    if torch.cuda.is_available():
        rng["cuda"] = [state.tolist() for state in torch.cuda.get_rng_state_all()]
    return rng


def restore_rng(rng: dict[str, Any]) -> None:
    version, mt_state, gauss = rng["python"]
    random.setstate((version, tuple(mt_state), gauss))
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = rng["numpy"]
    np.random.set_state((np_name, np.array(np_keys, dtype=np.uint32), np_pos, np_has_gauss, np_gauss))
    torch.set_rng_state(torch.tensor(rng["torch"], dtype=torch.uint8))
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in rng["cuda"]])


# ----------------------------------------------------------------------------------------------
# optimizer state <-> safetensors + json


def _split_optimizer_state(state_dict: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, Any] = {}
    for index, values in state_dict["state"].items():
        for key, value in values.items():
            name = f"{index}.{key}"
            if isinstance(value, torch.Tensor):
                tensors[name] = value.detach().contiguous().cpu()
            else:
                scalars[name] = value
    return tensors, {"param_groups": state_dict["param_groups"], "scalars": scalars}


def _join_optimizer_state(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for source in (tensors, meta["scalars"]):
        for name, value in source.items():
            index, key = name.split(".", 1)
            state.setdefault(int(index), {})[key] = value
    groups = []
    for group in meta["param_groups"]:
        group = dict(group)
        if isinstance(group.get("betas"), list):
            group["betas"] = tuple(group["betas"])
        groups.append(group)
    return {"state": state, "param_groups": groups}


# ----------------------------------------------------------------------------------------------
# files


def _write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=1))


def checkpoint_dir(root: Path, step: int) -> Path:
    return root / f"{PREFIX}{step}"


def save_checkpoint(
    root: Path,
    step: int,
    weights: dict[str, torch.Tensor],
    optimizer_state: dict[str, Any],
    rng: dict[str, Any],
    state: TrainState,
) -> Path:
    """Write checkpoint step-N by the protocol in the module docstring; returns its folder."""
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f"{_TMP_PREFIX}{PREFIX}{step}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    save_file({k: v.contiguous().cpu() for k, v in weights.items()}, str(tmp / "weights.safetensors"))
    opt_tensors, opt_meta = _split_optimizer_state(optimizer_state)
    save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
    _write_json(tmp / "optimizer.json", opt_meta)
    _write_json(tmp / "rng.json", rng)
    _write_json(tmp / "state.json", asdict(state))
    files = _describe(tmp, sorted(path.name for path in tmp.iterdir()))
    return _commit(root, step, tmp, {"format": _FORMAT, "step": step, "files": files})


def _describe(folder: Path, names: list[str]) -> dict[str, dict[str, Any]]:
    """fsync each file and record its size and sha256, for the manifest."""
    files = {}
    for name in names:
        path = folder / name
        fsync_file(path)
        files[name] = {"size": path.stat().st_size, "sha256": sha256_file(path)}
    return files


def _commit(root: Path, step: int, tmp: Path, manifest: dict[str, Any]) -> Path:
    """The end of the protocol: manifest, rename to step-N, COMPLETE last (each made durable)."""
    _write_json(tmp / MANIFEST, manifest)
    fsync_file(tmp / MANIFEST)
    for folder in {tmp, *((tmp / name).parent for name in manifest["files"])}:
        fsync_dir(folder)
    final = checkpoint_dir(root, step)
    if final.exists():
        # only a damaged or unfinished step-N can be here: resume starts from the newest good one
        shutil.rmtree(final)
    tmp.rename(final)
    fsync_dir(root)
    (final / COMPLETE).write_text(json.dumps({"step": step}))
    fsync_file(final / COMPLETE)
    fsync_dir(final)
    return final


def sharded_tmp_dir(root: Path, step: int) -> Path:
    """Where every rank writes its part of sharded checkpoint step-N: one name all ranks agree on."""
    return root / f"{_TMP_PREFIX}{PREFIX}{step}-{SHARDED}"


def start_sharded(root: Path, step: int) -> Path:
    """Rank 0, before the others write: an empty temporary folder (a crashed attempt's is removed)."""
    tmp = sharded_tmp_dir(root, step)
    if tmp.exists():
        shutil.rmtree(tmp)
    (tmp / DCP_DIR).mkdir(parents=True)
    return tmp


def finish_rank_files(tmp: Path, rank: int, rng: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Every rank, after DCP wrote its shards: write this rank's rng-R.json and describe the files
    this rank wrote (fsynced here, by their writer), for rank 0's manifest."""
    _write_json(tmp / f"rng-{rank}.json", rng)
    names = [f"rng-{rank}.json"]
    names += sorted(f"{DCP_DIR}/{path.name}" for path in (tmp / DCP_DIR).glob(f"__{rank}_*.distcp"))
    if rank == 0:
        names.append(f"{DCP_DIR}/.metadata")
    return _describe(tmp, names)


def commit_sharded(
    root: Path, step: int, files: dict[str, dict[str, Any]], world_size: int, state: TrainState
) -> Path:
    """Rank 0, once every rank described its files: state.json, the manifest, then COMPLETE."""
    tmp = sharded_tmp_dir(root, step)
    _write_json(tmp / "state.json", asdict(state))
    files = {**files, **_describe(tmp, ["state.json"])}
    manifest = {"format": _FORMAT, "kind": SHARDED, "world_size": world_size, "step": step, "files": files}
    return _commit(root, step, tmp, manifest)


def verify_checkpoint(path: Path) -> str | None:
    """None when the checkpoint is complete and intact, else what is wrong with it."""
    if not (path / COMPLETE).is_file():
        return "not complete (no COMPLETE marker)"
    try:
        manifest = json.loads((path / MANIFEST).read_text())
        files = manifest["files"]
    except FileNotFoundError:
        return "no manifest.json"
    except (json.JSONDecodeError, KeyError, TypeError):
        return "unreadable manifest.json"
    if manifest.get("format") != _FORMAT:
        return "written by another tunelab version"
    required = ("weights.safetensors", "optimizer.safetensors", "optimizer.json", "rng.json", "state.json")
    if manifest.get("kind") == SHARDED:
        required = (f"{DCP_DIR}/.metadata", "rng-0.json", "state.json")
    for name in required:
        if name not in files:
            return f"manifest does not list {name}"
    for name, expected in files.items():
        file = path / name
        if not file.is_file():
            return f"{name} is missing"
        if file.stat().st_size != expected["size"]:
            return f"{name} has {file.stat().st_size} bytes, expected {expected['size']}"
        if sha256_file(file) != expected["sha256"]:
            return f"{name} does not match its sha256"
    return None


def list_checkpoints(root: Path) -> list[tuple[int, Path]]:
    """(step, folder) of every step-N folder, complete or not, oldest first."""
    found = []
    if root.is_dir():
        for path in root.iterdir():
            number = path.name[len(PREFIX) :]
            if path.is_dir() and path.name.startswith(PREFIX) and number.isdigit():
                found.append((int(number), path))
    return sorted(found)


def find_resumable(root: Path) -> tuple[Path | None, list[str]]:
    """The newest verified checkpoint (or None) and a line for each newer one that was skipped."""
    skipped = []
    for _step, path in reversed(list_checkpoints(root)):
        problem = verify_checkpoint(path)
        if problem is None:
            return path, skipped
        skipped.append(f"checkpoint {path} skipped: {problem}")
    return None, skipped


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> Checkpoint:
    """Load a checkpoint that verify_checkpoint accepted."""
    problem = verify_checkpoint(path)
    if problem is not None:
        raise TunelabError(f"checkpoint {path} is unusable: {problem}")
    manifest = json.loads((path / MANIFEST).read_text())
    if manifest.get("kind") == SHARDED:
        rng = json.loads((path / "rng-0.json").read_text())
        state = TrainState(**json.loads((path / "state.json").read_text()))
        return Checkpoint(path, state.step, {}, {}, rng, state, sharded=True, world_size=manifest["world_size"])
    device = str(map_location)
    weights = load_file(str(path / "weights.safetensors"), device=device)
    opt_tensors = load_file(str(path / "optimizer.safetensors"), device=device)
    opt_meta = json.loads((path / "optimizer.json").read_text())
    rng = json.loads((path / "rng.json").read_text())
    state = TrainState(**json.loads((path / "state.json").read_text()))
    return Checkpoint(path, state.step, weights, _join_optimizer_state(opt_tensors, opt_meta), rng, state)


def load_weights(path: Path) -> dict[str, torch.Tensor]:
    """Only the weights of a verified checkpoint (e.g. the best one, for the final adapter/model)."""
    problem = verify_checkpoint(path)
    if problem is not None:
        raise TunelabError(f"checkpoint {path} is unusable: {problem}")
    return load_file(str(path / "weights.safetensors"))


def prune_checkpoints(root: Path, keep_last: int, keep_steps: set[int]) -> list[Path]:
    """After a new checkpoint is complete: delete all but the newest `keep_last` complete ones and
    those in `keep_steps` (the best). Unfinished folders older than the newest complete one and
    leftover temporary folders go too. Returns what was deleted."""
    checkpoints = list_checkpoints(root)
    complete = [(step, path) for step, path in checkpoints if (path / COMPLETE).is_file()]
    if not complete:
        return []
    newest = complete[-1][0]
    keep = {step for step, _ in complete[-keep_last:]} | keep_steps
    deleted = []
    for step, path in checkpoints:
        is_complete = (path / COMPLETE).is_file()
        if step in keep or (not is_complete and step > newest):
            continue
        shutil.rmtree(path)
        deleted.append(path)
    for path in root.iterdir():
        if path.name.startswith(_TMP_PREFIX) and path.is_dir():
            shutil.rmtree(path)
            deleted.append(path)
    return deleted


def remove_temporary(root: Path) -> None:
    """Temporary folders left by a process that died while writing a checkpoint."""
    if root.is_dir():
        for path in root.iterdir():
            if path.name.startswith(_TMP_PREFIX) and path.is_dir():
                shutil.rmtree(path)
