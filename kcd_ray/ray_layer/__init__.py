"""The Ray layer: everything in kcd_ray that imports Ray (Train worker and trainer, Data pipeline, mask store,
offline scoring, Tune). The engine, distillers, models and the KCD core below it are plain torch/numpy."""
