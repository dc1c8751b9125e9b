"""``transferkit export --format safetensors`` (the default): a plain transferkit model folder that ``load`` reads.

* a LoRA run: its peft adapter folder, which ``load`` puts back on the backbone's pretrained weights
  (:func:`transferkit.strategies.lora.load_lora_export`; a backbone without pretrained weights needs ``--merge``),
  or merged into the base weights with ``--merge`` (:func:`transferkit.strategies.lora.export_lora`, unchanged);
* an ``auto`` ensemble: the ensemble folder (``config.json`` with members and weights, one model folder per member
  under ``members/``), every LoRA member merged into its base weights, so no member needs peft to load;
* any other run: its ``model/`` folder (``model.safetensors`` + ``config.json``, and ``calibration.json`` when
  the run fitted a softmax temperature) on its own.

Written through :class:`~transferkit.rundir.OutputFolder` (kind ``export``): ``overwrite`` replaces only an earlier
export.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from transferkit.errors import TransferkitError

logger = logging.getLogger(__name__)

#: keys of a model's config.json that ``save_model`` / ``save_ensemble`` write themselves
_WRITTEN_KEYS = ("format", "format_version", "backbone", "modality", "tasks", "head_dropout", "strategy",
                 "preprocess_signature", "weights_sha256", "ensemble")


def _extra(config: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in config.items() if k not in _WRITTEN_KEYS and not k.startswith("_")}


def plain_member(loaded: Any) -> tuple[Any, dict[str, Any], dict[str, Any]]:
    """``(TransferModel, strategy dict, extra config)`` of a loaded model, a LoRA update merged into the base
    weights first (as ``export --merge`` writes it)."""
    strategy = dict(loaded.config.get("strategy") or {})
    extra = _extra(loaded.config)
    if strategy.get("name") == "lora" and not strategy.get("options", {}).get("_merged"):
        from transferkit.strategies.lora import EXPORT_KIND_KEY, merge_lora

        logger.info("merged %d LoRA layers into the base weights", merge_lora(loaded.module.backbone))
        strategy = {**strategy, "options": {**strategy.get("options", {}), "_merged": True}}
        extra[EXPORT_KIND_KEY] = "merged"
    return loaded.module, strategy, extra


def export_safetensors(model_dir: str | Path, out: str | Path, merge: bool = False, overwrite: bool = False) -> Path:
    """Write ``model_dir`` as a plain model folder at ``out`` (see the module docstring); returns ``out``."""
    from transferkit.api import EnsembleModel, load
    from transferkit.autofit.ensemble import ENSEMBLE_KEY, save_ensemble
    from transferkit.evaluation.calibration import copy_calibration
    from transferkit.model import read_model_config, save_model
    from transferkit.rundir import OutputFolder

    config = read_model_config(model_dir)
    if ENSEMBLE_KEY not in config and (config.get("strategy") or {}).get("name") == "lora":
        from transferkit.strategies.lora import export_lora

        return export_lora(model_dir, out, merge=merge, overwrite=overwrite)
    if merge and ENSEMBLE_KEY not in config:
        raise TransferkitError(f"--merge folds a LoRA update into its base weights, but the model in "
                               f"'{config['_folder']}' was trained with strategy "
                               f"'{(config.get('strategy') or {}).get('name')}'", "drop --merge")
    folder = OutputFolder(out, "export", overwrite=overwrite)
    folder.check()
    loaded = load(model_dir, device="cpu")
    loaded.refuse_language_model()
    folder.begin()
    with folder:
        if isinstance(loaded, EnsembleModel):
            save_ensemble(folder.stage, [plain_member(m) for m in loaded.members], list(loaded.weights),
                          extra=_extra(config))
        else:
            model, strategy, extra = plain_member(loaded)
            save_model(model, folder.stage, strategy, extra=extra)
            copy_calibration(config["_folder"], folder.stage)  # the fitted temperature travels with the model
        return folder.publish()
