"""The Pretrainer (dinov2-style meta-architecture): the model, the optional EMA target
model and the objectives chosen by ``objective.variant`` and its switches.

One ``forward(batch)`` computes every active objective with no redundant passes:

* the clean image and clean text are encoded once and shared by ITC, VICReg, ITM and
  the fusion passes; the masked image / masked text are encoded only when MIM / MRM /
  MLM need them (in the same tower call as the clean inputs);
* every fused pair of the step -- ITM's B positives and 2B negatives, ``F(I~,T)`` for
  MIM/MRM and ``F(I,T~)`` for MLM/MRM -- goes through ONE fusion call;
* the EMA model runs under no_grad, only when MRM or momentum-MIM needs it, and only
  as far as they need (image tower for momentum-MIM, the fused clean pair for MRM).

The EMA decay warms up (timm ``ModelEmaV3(use_warmup=True)``): the k-th update uses
``min(ema_alpha, 1 - k^-power)`` (the first copies the model), so that in a run of a
few hundred steps the teacher is not still mostly its random initial weights (with a
fixed 0.995 it keeps 0.995^100 = 61% of them after 100 steps); the decay of every step
is logged (``ema_decay`` in history.csv).
"""
from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn.functional as F
from timm.utils import ModelEmaV3
from torch import nn

from dmp_core.config import Config, ParamsError, ResolvedObjectives
from dmp_core.losses.distributed import gather_no_grad, gather_with_grad, global_max
from dmp_core.losses.swaps import SwapTable, swap_captions
from dmp_core.losses import (itc_loss, itm_loss, mim_loss, mlm_loss, mrm_loss, mrm_targets, resolve_objectives,
                             sample_negatives, vicreg_loss)
from dmp_core.losses.masking import IGNORE_INDEX, SpecialTokens, image_block_mask, mask_text
from dmp_core.losses.rerank import listwise_loss, neighbour_groups, residual_scores
from dmp_core.models import DMPModel
from dmp_core.targets import mim_targets
from dmp_core.models.heads import mlp_expander, mrm_predictor

LOSS_TERMS = {"pretrain": ("itc", "itm", "mlm", "mim", "mrm", "vicreg"), "finetune": ("itc", "itm")}


def vicreg_cov_floor(width: int, batch: int) -> float:
    """The lowest value the VICReg covariance term (summed over the two branches) can
    reach at unit variance: a covariance estimated from ``batch`` samples has rank
    ``r <= batch - 1``, so ``sum_{i!=j} C_ij^2 / d >= d / r - 1`` for each branch."""
    rank = max(1, batch - 1)
    return 2.0 * max(0.0, width / rank - 1.0)

FINETUNE_OBJECTIVES = ResolvedObjectives(
    variant="finetune", mrm=False, mim=False, mlm=False, itc=True, itm=True, vicreg=False, mim_target="none",
    itm_negatives="itc", image_mask_ratio=0.0, text_mask_ratio=0.0, needs_ema=False,
)


class Pretrainer(nn.Module):
    """``forward(batch) -> {"loss", "loss_<name>" per active objective (unweighted), "diag_*"}``."""

    def __init__(self, cfg: Config, stage: str, model: DMPModel, special: SpecialTokens = SpecialTokens(),
                 world_size: int = 1, swap_table: Optional[SwapTable] = None) -> None:
        super().__init__()
        if stage not in ("pretrain", "finetune"):
            raise ParamsError(f"stage must be pretrain or finetune, got {stage!r}")
        self.stage = stage
        self.model = model
        self.special = special
        self.objectives = FINETUNE_OBJECTIVES if stage == "finetune" else resolve_objectives(cfg.objective)
        obj, o = cfg.objective, self.objectives
        self.weights = {"itc": obj.w_itc, "itm": obj.w_itm, "mlm": obj.w_mlm, "mim": obj.w_mim,
                        "mrm": obj.w_mrm, "vicreg": obj.w_vicreg}
        self.vicreg_coeffs = dict(sim_coeff=obj.vicreg_coeffs.sim_coeff, std_coeff=obj.vicreg_coeffs.std_coeff,
                                  cov_coeff=obj.vicreg_coeffs.cov_coeff)
        self.text_mask_rule = obj.text_mask_rule
        self.cfg = cfg
        self.terms = tuple(t for t in LOSS_TERMS[stage] if getattr(self.objectives, t))

        if o.mim and model.mim_head is None:
            raise ParamsError(f"objective has MIM but model preset {cfg.model.preset} was built without a MIM head "
                              "(build it with dmp_core.models.model_from_config)")
        self.mrm_predictor = mrm_predictor(model.text_dim) if o.mrm else None
        global_batch = getattr(cfg, stage).batch_size * world_size
        self.expander_dim = obj.vicreg_coeffs.expander_dim or global_batch
        self.cov_floor = vicreg_cov_floor(self.expander_dim, global_batch)
        self.image_expander = mlp_expander(model.embed_dim, self.expander_dim) if o.vicreg else None
        self.text_expander = mlp_expander(model.embed_dim, self.expander_dim) if o.vicreg else None
        # ITM's swapped-caption negatives (objective.itm_swap_negatives; dmp_core.losses.swaps)
        self.swap_table = swap_table if self.objectives.itm and cfg.objective.itm_swap_negatives else None
        # ITM's loss: the seed's binary one, listwise over ITC neighbourhoods (dmp_core.losses.rerank), or both
        self.itm_loss = cfg.objective.itm_loss
        self.listwise = self.itm_loss in ("listwise", "both")
        self.progress = 0.0  # share of the run done, set by the training loop (ITM hard-negative ramp)
        # variant=frozen (the LiT baseline): both towers locked in pretraining and finetuning
        self.frozen_towers = cfg.objective.variant == "frozen"
        if self.frozen_towers:
            model.vision.requires_grad_(False)
            model.text.requires_grad_(False)
        self.ema: Optional[ModelEmaV3] = None
        self.ema_decay = 0.0
        if o.needs_ema:
            self.ema = ModelEmaV3(model, decay=obj.ema_alpha, use_warmup=obj.ema_warmup,
                                  warmup_power=obj.ema_warmup_power)
            self.ema.module.requires_grad_(False)

    # ------------------------------------------------------------------ housekeeping
    def train(self, mode: bool = True) -> "Pretrainer":
        super().train(mode)
        if self.ema is not None:
            self.ema.module.eval()  # the target network never uses dropout
        if self.frozen_towers:
            self.model.vision.eval()  # locked towers: no dropout, fixed statistics
            self.model.text.eval()
        return self

    @torch.no_grad()
    def update_ema(self, step: int) -> Optional[float]:
        """Call after optimiser step ``step`` (1-based); returns the decay used (None
        without an EMA model). With the warm-up the decay is ``min(ema_alpha, 1 - step^-power)``
        (0 at step 1: the teacher starts as a copy); without it, ``ema_alpha``."""
        if self.ema is None:
            return None
        self.ema_decay = float(self.ema.get_decay(step))
        self.ema.update(self.model, step=step)
        return self.ema_decay

    # ------------------------------------------------------------------ the step
    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        model, o = self.model, self.objectives
        device = model.temp.device
        raw_images = batch["image"].to(device)
        images = model.preprocess(raw_images)
        # captions are right-padded to data.max_tokens: cut the batch to its longest caption
        # (exact: padding never changes a real token's state), which saves text and fusion work
        width = global_max(int(batch["attention_mask"].sum(dim=1).max()), device)  # equal on every rank
        ids = batch["input_ids"][:, :width].to(device)
        attn = batch["attention_mask"][:, :width].to(device)
        image_ids = batch["image_id"].to(device)
        b, layout = ids.shape[0], model.layout
        terms: dict[str, torch.Tensor] = {}
        diags: dict[str, torch.Tensor] = {"diag_temperature": model.temperature.detach()}

        # --- masks (global RNG: deterministic given the seed)
        need_masked_image = o.mim or o.mrm
        need_masked_text = o.mlm or o.mrm
        patch_mask = (image_block_mask(b, model.grid_size, o.image_mask_ratio, block=model.mask_block, device=device)
                      if need_masked_image else None)
        masked_ids = labels = None
        if need_masked_text:
            masked_ids, labels = mask_text(ids, attn, o.text_mask_ratio, special=self.special,
                                           vocab_size=model.vocab_size, rule=self.text_mask_rule)

        # --- unimodal encodings: clean (+ masked) in one tower call each
        if patch_mask is not None:
            no_mask = torch.zeros_like(patch_mask)
            both = model.encode_image(torch.cat([images, images]), torch.cat([no_mask, patch_mask]))
            v, v_masked = both[:b], both[b:]
        else:
            v, v_masked = model.encode_image(images), None
        # ITM's swapped-caption negatives (the anchor's caption, binding contradicted)
        swapped = None
        if o.itm and self.swap_table is not None:
            swapped_ids, swap_ok = swap_captions(ids, self.swap_table)
            if bool(swap_ok.any()):
                swapped = (swapped_ids[swap_ok], attn[swap_ok], swap_ok)
        text_ids = [ids] + ([masked_ids] if masked_ids is not None else []) + ([swapped[0]] if swapped else [])
        text_attn = [attn] + ([attn] if masked_ids is not None else []) + ([swapped[1]] if swapped else [])
        states = model.encode_text(torch.cat(text_ids), torch.cat(text_attn))
        t = states[:b]
        t_masked = states[b:2 * b] if masked_ids is not None else None
        t_swapped = states[len(states) - len(swapped[0]):] if swapped else None
        diags["diag_itm_swapped"] = torch.tensor(float(len(swapped[0]) if swapped else 0) / b)

        # --- ITC / VICReg on the clean [CLS] states
        img_emb = txt_emb = None
        if o.itc:
            img_emb, txt_emb = model.image_embed(v), model.text_embed(t, attn)
            terms["itc"] = itc_loss(img_emb, txt_emb, image_ids, model.temperature, texts=ids)
        elif o.itm_negatives == "vicreg":
            # without ITC the [CLS] projections are trained by VICReg (through the expanders)
            # and serve first-stage retrieval: ITM negatives come from their similarity
            with torch.no_grad():
                img_emb, txt_emb = model.image_embed(v), model.text_embed(t, attn)
        if o.vicreg:
            vic = vicreg_loss(self.image_expander(model.image_features(v)),
                              self.text_expander(model.text_features(t, attn)), **self.vicreg_coeffs)
            terms["vicreg"] = vic["loss"]
            diags.update({f"diag_vicreg_{k}": vic[k].detach() for k in ("sim", "std", "cov")})
            diags["diag_vicreg_cov_floor"] = torch.tensor(self.cov_floor)

        # --- every fusion pass of the step in one call
        pairs: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        groups = None
        if o.itm and self.listwise:
            pairs["itm"], groups = self._itm_groups(v, t, attn, ids, image_ids, img_emb, txt_emb, swapped, t_swapped)
        elif o.itm:
            pairs["itm"] = self._itm_pairs(v, t, attn, ids, image_ids, img_emb, txt_emb)
            if swapped is not None:  # (image, its own caption with the binding contradicted): label 0
                pairs["itm"] = tuple(torch.cat([x, y]) for x, y in
                                     zip(pairs["itm"], (v[swapped[2]], t_swapped, swapped[1])))
        if v_masked is not None:
            pairs["masked_image"] = (v_masked, t, attn)
        if t_masked is not None:
            pairs["masked_text"] = (v, t_masked, attn)
        joint = self._fuse_all(pairs)

        if o.itm and groups is not None:
            margin, residual = model.pair_scores(joint["itm"], pairs["itm"][2])
            itm = self._listwise_itm(residual[:groups["n_grouped"]], groups)
            terms["itm"] = itm.pop("loss")
            diags.update(itm)
            if self.itm_loss == "both":  # the 2-way ITM on every fused pair: positives first
                matched = torch.zeros_like(margin, dtype=torch.float32)
                matched[:b] = 1.0
                binary = F.binary_cross_entropy_with_logits(margin.float(), matched)
                diags["diag_itm_listwise"] = terms["itm"].detach()
                diags["diag_itm_binary"] = binary.detach()
                terms["itm"] = terms["itm"] + binary
        elif o.itm:
            logits = model.itm_logits(joint["itm"], pairs["itm"][2])
            itm_labels = torch.zeros(logits.shape[0], dtype=torch.long, device=device)
            itm_labels[:b] = 1
            terms["itm"] = itm_loss(logits, itm_labels)
            diags["diag_itm_acc"] = (logits.argmax(dim=1) == itm_labels).float().mean().detach()

        # --- EMA target network, only as far as needed
        ema_v = ema_joint = None
        if self.ema is not None:
            with torch.no_grad():
                ema = self.ema.module
                ema_v = ema.encode_image(images)
                if o.mrm:
                    ema_joint = ema.fuse(ema_v, ema.encode_text(ids, attn), attn)

        if o.mim:
            target = self._mim_target(batch, raw_images, ema_v)
            terms["mim"] = mim_loss(model.mim_predictions(joint["masked_image"]), target, patch_mask, o.mim_target)
        if o.mlm:
            selected = labels != IGNORE_INDEX
            tokens = layout.tokens(joint["masked_text"])[selected]
            terms["mlm"] = mlm_loss(model.mlm_logits(tokens), labels[selected])
        if o.mrm:
            target = mrm_targets(ema_joint)
            img_sel, txt_sel = patch_mask, labels != IGNORE_INDEX
            pred = torch.cat([self.mrm_predictor(layout.patches(joint["masked_image"])[img_sel]),
                              self.mrm_predictor(layout.tokens(joint["masked_text"])[txt_sel])])
            tgt = torch.cat([layout.patches(target)[img_sel], layout.tokens(target)[txt_sel]])
            mrm = mrm_loss(pred, tgt, torch.ones(pred.shape[0], dtype=torch.bool, device=device))
            terms["mrm"] = mrm["loss"]
            diags["diag_mrm_target_std"] = mrm["target_std"]

        total = sum(self.weights[name] * value for name, value in terms.items())
        out = {"loss": total}
        out.update({f"loss_{name}": value for name, value in terms.items()})
        out.update(diags)
        return out

    def hardness(self) -> float:
        """How hard the ITM negatives are drawn: the similarity logits are multiplied by this
        before the softmax (0 = uniform, 1 = ALBEF's softmax). It ramps linearly from 0 to 1
        over the first ``objective.itm_hard_warmup`` share of the run (``self.progress``,
        set by the training loop before each step)."""
        warm = self.cfg.objective.itm_hard_warmup
        return 1.0 if warm <= 0 else min(1.0, self.progress / warm)

    def _itm_pairs(self, v: torch.Tensor, t: torch.Tensor, attn: torch.Tensor, ids: torch.Tensor,
                   image_ids: torch.Tensor, img_emb: Optional[torch.Tensor], txt_emb: Optional[torch.Tensor],
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(image states, text states, text mask) of ITM's pairs: the B positives, then per
        anchor and direction one negative from the similarity softmax (``itm_negatives``) and,
        with ``itm_uniform_negatives``, one drawn uniformly from the batch. Negatives come
        from the whole (under DDP: gathered) batch; the gathered states keep their gradients,
        which flow back to the rank that encoded them."""
        model, o, b = self.model, self.objectives, ids.shape[0]
        all_ids, v_all, t_all, attn_all = (gather_no_grad(image_ids), gather_with_grad(v),
                                           gather_with_grad(t), gather_no_grad(attn))
        all_texts = gather_no_grad(ids)
        sim_i2t = sim_t2i = None
        if o.itm_negatives != "uniform":
            with torch.no_grad():
                scale = self.hardness() / model.temperature.detach().float()
                img, txt = img_emb.detach().float(), txt_emb.detach().float()
                sim_i2t = img @ gather_no_grad(txt).t() * scale
                sim_t2i = txt @ gather_no_grad(img).t() * scale
        draws = [sample_negatives(sim_i2t, image_ids, all_ids=all_ids, sim_t2i=sim_t2i, texts=ids,
                                  all_texts=all_texts)]
        if self.cfg.objective.itm_uniform_negatives and o.itm_negatives != "uniform":
            draws.append(sample_negatives(None, image_ids, all_ids=all_ids, texts=ids, all_texts=all_texts))
        rows = torch.arange(b, device=ids.device)
        images, texts, masks = [v], [t], [attn]
        for neg_txt, neg_img in draws:
            ok_t, ok_i = neg_txt >= 0, neg_img >= 0
            images += [v[rows[ok_t]], v_all[neg_img[ok_i]]]
            texts += [t_all[neg_txt[ok_t]], t[rows[ok_i]]]
            masks += [attn_all[neg_txt[ok_t]], attn[rows[ok_i]]]
        return torch.cat(images), torch.cat(texts), torch.cat(masks)

    def _itm_groups(self, v: torch.Tensor, t: torch.Tensor, attn: torch.Tensor, ids: torch.Tensor,
                    image_ids: torch.Tensor, img_emb: Optional[torch.Tensor], txt_emb: Optional[torch.Tensor],
                    swapped: Optional[tuple], t_swapped: Optional[torch.Tensor]) -> tuple[tuple, dict]:
        """The fused pairs of listwise ITM and the groups they form (:mod:`dmp_core.losses.rerank`).

        Every anchor, in each direction, gets a group: its positive and its ``itm_group_size``
        ITC-nearest in-batch candidates of other images (uniform draws with
        ``itm_negatives=uniform``); with swapped-caption negatives, an image anchor's group
        also holds its own caption with the binding contradicted. Only valid candidates are
        fused: the B positives first, then the image groups' and the caption groups'
        negatives, then the swapped captions (``groups["n_grouped"]`` pairs in all); with
        ``itm_loss=both`` one uniform negative per anchor and direction follows, for the binary
        loss only. Returns ``(pairs, groups)``: ``groups`` carries the ITC similarities and
        where each fused score goes back."""
        model, o, b = self.model, self.objectives, ids.shape[0]
        k = self.cfg.objective.itm_group_size
        all_ids, all_texts = gather_no_grad(image_ids), gather_no_grad(ids)
        v_all, t_all, attn_all = gather_with_grad(v), gather_with_grad(t), gather_no_grad(attn)
        sim_i2t = sim_t2i = None
        pos_sim = torch.zeros(b, device=ids.device)
        if img_emb is not None:
            with torch.no_grad():
                img, txt = img_emb.detach().float(), txt_emb.detach().float()
                sim_i2t, sim_t2i = img @ gather_no_grad(txt).t(), txt @ gather_no_grad(img).t()
                pos_sim = (img * txt).sum(dim=1)
        pick = o.itm_negatives != "uniform"
        neg_t, ok_t = neighbour_groups(sim_i2t if pick else None, image_ids, k, all_ids=all_ids, texts=ids,
                                       all_texts=all_texts)
        neg_i, ok_i = neighbour_groups(sim_t2i if pick else None, image_ids, k, all_ids=all_ids, texts=ids,
                                       all_texts=all_texts)
        rows = torch.arange(b, device=ids.device)[:, None].expand_as(neg_t)
        images = [v, v[rows[ok_t]], v_all[neg_i[ok_i]]]
        texts = [t, t_all[neg_t[ok_t]], t[rows[ok_i]]]
        masks = [attn, attn_all[neg_t[ok_t]], attn[rows[ok_i]]]
        group_sim = lambda sim, neg: (torch.zeros(neg.shape, device=ids.device) if sim is None  # noqa: E731
                                      else sim.gather(1, neg))
        groups = {"pos_sim": pos_sim, "i2t": (group_sim(sim_i2t, neg_t), ok_t),
                  "t2i": (group_sim(sim_t2i, neg_i), ok_i), "swap": None}
        if swapped is not None:
            sw_ids, sw_attn, sw_ok = swapped
            images.append(v[sw_ok])
            texts.append(t_swapped)
            masks.append(sw_attn)
            sw_sim = torch.zeros(b, device=ids.device)
            if img_emb is not None:
                with torch.no_grad():
                    sw_emb = model.text_embed(t_swapped, sw_attn).detach().float()
                    sw_sim[sw_ok] = (img_emb.detach().float()[sw_ok] * sw_emb).sum(dim=1)
            groups["swap"] = (sw_sim, sw_ok)
        groups["n_grouped"] = sum(len(x) for x in images)
        if self.itm_loss == "both":  # the binary loss's easy negatives: one uniform draw per anchor and direction
            uni_t, ok_ut = neighbour_groups(None, image_ids, 1, all_ids=all_ids, texts=ids, all_texts=all_texts)
            uni_i, ok_ui = neighbour_groups(None, image_ids, 1, all_ids=all_ids, texts=ids, all_texts=all_texts)
            one = torch.arange(b, device=ids.device)[:, None]
            images += [v[one[ok_ut]], v_all[uni_i[ok_ui]]]
            texts += [t_all[uni_t[ok_ut]], t[one[ok_ui]]]
            masks += [attn_all[uni_t[ok_ut]], attn[one[ok_ui]]]
        return (torch.cat(images), torch.cat(texts), torch.cat(masks)), groups

    def _listwise_itm(self, margin: torch.Tensor, groups: dict) -> dict[str, torch.Tensor]:
        """Cross-entropy over each group of residual scores (``stop_grad(s) / rerank_tau + r``;
        ``margin``: the correction r of each grouped pair, in fusion order: positives, image
        groups, caption groups, swapped captions),
        the mean of the image-anchor and caption-anchor directions. Diagnostics: the share of
        groups whose positive scores highest, and the probability the ITC term alone gives
        the positive (near 1: the ITC term saturates the softmax and the head learns little)."""
        obj = self.cfg.objective
        b = groups["pos_sim"].shape[0]
        n_swap = int(groups["swap"][1].sum()) if groups["swap"] is not None else 0
        m_pos, rest, m_swap = margin[:b], margin[b:len(margin) - n_swap], margin[len(margin) - n_swap:]
        losses, accs, itc_p = [], [], []
        for direction in ("i2t", "t2i"):
            sim, ok = groups[direction]
            m = torch.zeros(ok.shape, dtype=margin.dtype, device=margin.device)
            n = int(ok.sum())
            m = m.masked_scatter(ok, rest[:n])
            rest = rest[n:]
            cols_sim, cols_m, cols_ok = [groups["pos_sim"][:, None], sim], [m_pos[:, None], m], [
                torch.ones(b, 1, dtype=torch.bool, device=ok.device), ok]
            if direction == "i2t" and groups["swap"] is not None:
                sw_sim, sw_ok = groups["swap"]
                sw_m = torch.zeros(b, dtype=margin.dtype, device=margin.device).masked_scatter(sw_ok, m_swap)
                cols_sim.append(sw_sim[:, None]); cols_m.append(sw_m[:, None]); cols_ok.append(sw_ok[:, None])
            sim_g, m_g, ok_g = torch.cat(cols_sim, 1), torch.cat(cols_m, 1), torch.cat(cols_ok, 1)
            itc_only = F.softmax((sim_g / obj.rerank_tau).masked_fill(~ok_g, float("-inf")), dim=1)
            soft = None
            if obj.itm_soft_targets > 0:
                onehot = torch.zeros_like(itc_only)
                onehot[:, 0] = 1.0
                soft = (1 - obj.itm_soft_targets) * onehot + obj.itm_soft_targets * itc_only
            out = listwise_loss(residual_scores(sim_g, m_g, obj.rerank_tau), ok_g, soft)
            losses.append(out["loss"])
            accs.append(out["acc"])
            itc_p.append(itc_only[:, 0].mean())
        return {"loss": (losses[0] + losses[1]) / 2, "diag_itm_acc": (accs[0] + accs[1]) / 2,
                "diag_itm_itc_p": ((itc_p[0] + itc_p[1]) / 2).detach()}

    def _fuse_all(self, pairs: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]) -> dict[str, torch.Tensor]:
        if not pairs:
            return {}
        names = list(pairs)
        sizes = [pairs[k][0].shape[0] for k in names]
        joint = self.model.fuse(*(torch.cat([pairs[k][i] for k in names]) for i in range(3)))
        return dict(zip(names, joint.split(sizes)))

    def _mim_target(self, batch: dict[str, torch.Tensor], raw_images: torch.Tensor,
                    ema_v: Optional[torch.Tensor]) -> torch.Tensor:
        """Precomputed targets from the loader when present, else computed on the fly."""
        kind = self.objectives.mim_target
        if kind == "momentum":
            return ema_v[:, 1:]
        return mim_targets(self.cfg, kind, raw_images, self.model.pixel_mean, self.model.pixel_std, batch.get(kind))


def create_pretrainer(cfg: Config, stage: str, model: DMPModel, *, special: Optional[SpecialTokens] = None,
                      meta: Optional[dict[str, Any]] = None, world_size: int = 1) -> Pretrainer:
    """The Pretrainer for ``stage`` ("pretrain": the variant's objectives; "finetune": ITC + ITM).

    Special token ids come from ``special``, or from the prepared data's ``meta`` (meta.json),
    else MiniLM's defaults (pad 0, cls 101, sep 102, mask 103). ``world_size`` sets the
    global batch (the default VICReg expander width)."""
    if special is None:
        special = SpecialTokens.from_meta(meta) if meta is not None else SpecialTokens()
    table = None
    if cfg.objective.itm_swap_negatives:
        from dmp_core.data.text import swap_table

        table = swap_table(cfg.data.tokenizer)
    return Pretrainer(cfg, stage, model, special, world_size=world_size, swap_table=table)
