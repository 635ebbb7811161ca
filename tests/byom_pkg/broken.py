"""A module whose import fails, as a user's module with a missing dependency does."""

import kcd_ray_no_such_dependency  # noqa: F401
