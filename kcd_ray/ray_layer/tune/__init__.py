"""Ray Tune sweeps over any config field: ``sweep`` (run_sweep, trials), ``resources``, ``searchers``, ``hooks``,
``interrupt``. The Ray-free parts are ``kcd_ray.sweeps`` (spec, space, feasibility) and ``kcd_ray.report``."""
