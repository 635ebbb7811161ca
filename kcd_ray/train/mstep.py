"""The M-step on Ray: turn a condensation result (pure core: `kcd_ray.condense`) into what the pipeline serves.

Rank 0 writes the VAKS summary blends as an overlay (`kcd_ray.data.blend`), persists the mask version as
Parquet (``masks/mask_v<k>.parquet``: sample_id, score, kept, partner_id, mix_weight, stage) and publishes
(kept ids, overlay) to the run's MaskStore actor. The Ray Data plan reads the store when the next epoch
executes, before sharding, so every worker sees the same kept set with blended images in place.
"""

from __future__ import annotations

import json

from kcd_ray.data.blend import check_overlay, write_blend_overlay
from kcd_ray.data.mask import publish_mask
from kcd_ray.train.metrics import say
from kcd_ray.train.rundir import RunDir


def mask_path(run_dir: RunDir, version: int):
    return run_dir.sub("masks", f"mask_v{version:03d}.parquet")


def _manifest_path(run_dir: RunDir, version: int):
    return run_dir.sub("blends", f"manifest_v{version:03d}.json")


def _load_manifest(run_dir: RunDir, version: int) -> dict | None:
    # The newest overlay at or before `version` (a stage without summary keeps the previous blends).
    for v in range(version, 0, -1):
        p = run_dir.path / "blends" / f"manifest_v{v:03d}.json"
        if p.exists():
            try:
                return json.loads(p.read_text())
            except json.JSONDecodeError:
                raise ValueError(f"{p}: corrupt blend manifest (not JSON)") from None
    return None


def apply_condensation(kcd, result, config: dict, run_dir: RunDir, verbose: bool) -> None:
    overlay = _load_manifest(run_dir, result.version - 1)
    if len(result.tail_ids):
        overlay = write_blend_overlay(
            config["data_dir"], str(run_dir.path / "blends"), result.version, result.tail_ids, result.lost_ids,
            result.weights, prev_overlay=overlay,
        )
        _manifest_path(run_dir, result.version).write_text(json.dumps(overlay))
    kcd.write_mask(mask_path(run_dir, result.version))
    # replace: after a worker-group restart the store may already hold this version from the lost attempt.
    publish_mask(config["mask_store"], result.version, kcd.kept_ids(), overlay, replace=True)
    if verbose:
        say(
            f"[kcd_ray] condensation v{result.version} (stage {result.stage}): kept {len(kcd.kept_ids())}/{kcd.num_samples} "
            f"({100 * (kcd.k / kcd.num_samples):.1f}%), {len(result.tail_ids)} summary blends"
        )


def republish(kcd, config: dict, run_dir: RunDir) -> None:
    """Serve the checkpoint's mask: a re-run driver has a new, empty store, and after a worker-group restart
    the store may hold a newer version published by the lost attempt."""
    overlay = _load_manifest(run_dir, kcd.version)
    check_overlay(overlay)
    publish_mask(config["mask_store"], kcd.version, kcd.kept_ids(), overlay, replace=True)


def write_final_mask(kcd, run_dir: RunDir) -> None:
    kcd.write_mask(run_dir.sub("masks", "mask_final.parquet"))
