"""Teacher-output cache: the teacher's outputs on every augmented view a run will show, computed once and shared
by every run and sweep trial with the same teacher, data, augmentation and seed (pure numpy/torch/pyarrow; the
Ray Data build pass lives in ``kcd_ray.ray_layer.teacher_cache``)."""

from kcd_ray.cache.store import (CacheError, CacheSpec, TeacherLookup, augment_uniforms, cache_key,
                                 check_manifest, read_manifest, units_for)

__all__ = ["CacheError", "CacheSpec", "TeacherLookup", "augment_uniforms", "cache_key",
           "check_manifest", "read_manifest", "units_for"]
