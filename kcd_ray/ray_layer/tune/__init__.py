"""Ray Tune sweeps over any config field (``sweep``, ``spec``, ``space``) and the sweep/run report (``report``)."""
