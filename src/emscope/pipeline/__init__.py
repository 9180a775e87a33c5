"""``emscope run``: one experiment YAML -> every stage of the study -> one run dir.

- :mod:`.config`: the pydantic config (:func:`load_config`), validated before any work;
- :mod:`.stages`: one module per stage (its config model, ``run``, ``describe``), wiring
  the analysis libraries, and the registry that orders them;
- :mod:`.runner`: dependency order, resume (``done.json``), manifest (:func:`run_study`);
- :mod:`.claims`: the claims table of docs/methods.md section 8 from a run
  dir (:func:`claims_table`).
"""

from emscope.pipeline.config import STAGE_ORDER, StudyConfig, load_config, parse_config

__all__ = ["STAGE_ORDER", "StudyConfig", "load_config", "parse_config"]
