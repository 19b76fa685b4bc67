"""How the Flower apps get their Config: a closure (`fedcollm run`) or the run config (`flwr run`)."""

from __future__ import annotations

from fedcollm.config import Config, load_config


def config_from_run_config(run_config) -> Config:
    """Keys of `[tool.flwr.app.config]` / `--run-config`: preset, config-file, overrides, out-dir.

    `overrides` holds `section.key=value` items separated by ';'.
    """
    overrides = [s for s in str(run_config.get("overrides", "")).split(";") if s.strip()]
    if run_config.get("out-dir"):
        overrides.append(f"run.out_dir={run_config['out-dir']!r}".replace("'", '"'))
    return load_config(run_config.get("config-file") or None, overrides,
                       preset=run_config.get("preset") or None)
