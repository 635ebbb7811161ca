"""A user's own package of models, as kcd_ray imports it by ``byom_pkg.models:<factory>`` (tests/test_byom.py)."""
