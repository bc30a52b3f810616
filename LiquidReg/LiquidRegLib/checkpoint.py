"""Weights and training checkpoints on disk: versioned, checksummed, written atomically.

A file is a small torch-saved envelope ``{"format", "format_version", "kind", "sha256",
"payload"}`` whose ``payload`` is the torch-serialised content.  The checksum covers the payload,
so truncation or bit rot is caught before anything is unpickled, and ``weights_only`` loading
never executes code from the file.  Writes go to a temporary file in the same folder, are
fsync'ed and then renamed over the target, so a crash mid-write leaves the previous file intact.
"""
from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path

import torch

from .errors import WeightsError
from .model import LiquidReg, ModelConfig
from .resources import default_weights

FORMAT = "liquidreg"
FORMAT_VERSION = 1
MODEL_NAME = "liquidreg_brain"
MODEL_VERSION = "3"


def _write_durably(path, data: bytes, replace: bool = True) -> None:
    """Atomic (temp file + rename, via io.atomic_output) and fsync'ed before the rename; with
    ``replace`` off an existing file is never replaced, even one created meanwhile."""
    from .io import atomic_output
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(path, replace=replace) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())


def save(path, content: dict, kind: str, *, replace: bool = True) -> str:
    """Save ``content`` (tensors, numbers, strings, dicts) as a checksummed envelope; returns sha256.
    ``replace=False``: never over an existing file."""
    buffer = io.BytesIO()
    torch.save(content, buffer)
    payload = buffer.getvalue()
    digest = hashlib.sha256(payload).hexdigest()
    envelope = io.BytesIO()
    torch.save({"format": FORMAT, "format_version": FORMAT_VERSION, "kind": kind,
                "sha256": digest, "payload": payload}, envelope)
    _write_durably(path, envelope.getvalue(), replace)
    return digest


def load(path, kind: str) -> tuple[dict, str]:
    """Load and verify an envelope written by :func:`save`; returns (content, sha256)."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"weights file '{path}' does not exist; check the path")
    try:
        envelope = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise WeightsError(f"'{path}' is not a readable LiquidReg weights file ({type(exc).__name__}); "
                           "it is corrupt or truncated: download or re-create it") from None
    if not isinstance(envelope, dict) or envelope.get("format") != FORMAT:
        raise WeightsError(f"'{path}' is not a LiquidReg {kind} file; pass a file written by "
                           "LiquidReg (liquidreg finetune or the shipped weights)")
    if envelope.get("format_version", 0) > FORMAT_VERSION:
        raise WeightsError(f"'{path}' has format version {envelope.get('format_version')}, newer "
                           f"than this LiquidReg supports ({FORMAT_VERSION}); upgrade LiquidReg")
    if envelope.get("kind") != kind:
        raise WeightsError(f"'{path}' holds a {envelope.get('kind')}, not a {kind}; pass a "
                           f"{kind} file")
    payload = envelope.get("payload", b"")
    digest = hashlib.sha256(payload).hexdigest()
    if digest != envelope.get("sha256"):
        raise WeightsError(f"'{path}' fails its checksum (file corrupt); download or re-create it")
    content = torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True)
    return content, digest


def save_weights(path, model: LiquidReg, meta: dict | None = None, *, name: str = MODEL_NAME,
                 version: str = MODEL_VERSION, replace: bool = True) -> str:
    """Save inference weights (config + state dict + free-form metadata such as the recipe)."""
    return save(path, {"name": name, "version": version,
                       "config": model.config.to_dict(), "state_dict": model.state_dict(),
                       "meta": dict(meta or {})}, kind="weights", replace=replace)


def load_model(weights=None, device="cpu") -> tuple[LiquidReg, dict]:
    """Build the network from a weights file (default: the shipped one); returns (model, info)."""
    path = Path(weights) if weights is not None else default_weights()
    if weights is None and not path.is_file():
        raise WeightsError(f"the weights shipped with LiquidReg are missing from this installation "
                           f"('{path}'); reinstall LiquidReg, or pass a weights file")
    content, digest = load(path, kind="weights")
    try:
        model = LiquidReg(ModelConfig.from_dict(content["config"]))
        model.load_state_dict(content["state_dict"])
    except (KeyError, TypeError, RuntimeError) as exc:
        raise WeightsError(f"'{path}' does not match this LiquidReg's network ({exc.__class__.__name__}: "
                           f"{str(exc).splitlines()[0][:120]}); use weights made for this version") from None
    model.to(device).eval()
    info = {"name": content.get("name", MODEL_NAME), "version": content.get("version", "?"),
            "sha256": digest, "path": str(path), "meta": content.get("meta", {})}
    return model, info


def model_summary(info: dict) -> dict:
    """How summary.json names the weights a registration used (and, for fine-tuned weights, the
    weights they were made from)."""
    summary = {k: info[k] for k in ("name", "version", "sha256", "path")}
    origin = (info.get("meta") or {}).get("finetuned_from")
    if origin:
        summary["finetuned_from"] = origin
    return summary
