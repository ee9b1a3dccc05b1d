"""The objectives, one small module each; see dmp_core.training.meta_arch for how they combine."""
from dmp_core.config import ObjectiveParams, ParamsError, ResolvedObjectives
from dmp_core.losses.itc import itc_loss, positive_targets, same_pair
from dmp_core.losses.itm import itm_loss, sample_negatives
from dmp_core.losses.mim import mim_loss
from dmp_core.losses.mlm import mlm_loss
from dmp_core.losses.mrm import mrm_loss, mrm_targets
from dmp_core.losses.vicreg import vicreg_loss


def resolve_objectives(objective: ObjectiveParams) -> ResolvedObjectives:
    """The objectives a run uses: the variant's recipe with the switches applied (validated)."""
    try:
        return objective.resolve()
    except ValueError as err:
        raise ParamsError(f"objective: {err}") from None


__all__ = [
    "itc_loss", "itm_loss", "mim_loss", "mlm_loss", "mrm_loss", "mrm_targets", "positive_targets",
    "resolve_objectives", "same_pair", "sample_negatives", "vicreg_loss", "ResolvedObjectives",
]
