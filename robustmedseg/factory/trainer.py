"""One Fed-BioMed update of the data factory (docs/method.md#training-step with the docs/differences.md fixes).

Fed-BioMed drives every update as ``zero_grad(); loss = training_step(real, target);
loss.backward(); optimizer.step()``. :class:`FactoryTrainer` implements ``training_step`` with a
node-local update counter ``step`` that continues across rounds (:mod:`.state`):

* even ``step`` -> D update, odd ``step`` -> G update (D index = G index = ``step // 2``);
* D update: regular logistic loss on (augmented) real vs fake images generated under the real
  batch's condition (and encoding); ADA ``p`` is tuned from ``D(real)`` after every regular D loss.
  When ``(step // 2) % d_reg_every == 0`` the update index also takes an R1 step;
* G update: non-saturating loss on augmented fakes, plus the CLIP spherical loss (on the
  un-augmented fake) when ``clip_weight > 0`` and the batch is CLIP-conditioned. When
  ``(step // 2) % g_reg_every == 0`` the update index also takes a path-length step;
* at every G update the EMA generator moves: ``g_ema <- d * g_ema + (1 - d) * G``,
  d = 0.5^(32/10000) (parameters only), with G's parameters from *before* this update's optimiser
  step(s), as in the original (whose EMA ran inside ``training_step``, before Fed-BioMed's step).

**Lazy regularisation ADDS a step (decision for docs/differences.md#d9-8).** As in StyleGAN2 (and the MVS
centralised script), a regularised update index takes the regular step *and then* a separate
regulariser step: the regular loss is back-propagated and applied inside ``training_step``
(:meth:`AlternatingAdam.inner_step`), and the regulariser loss (R1 weighted ``r1/2 * d_reg_every``,
path length weighted ``path_regularize * g_reg_every``) is returned for Fed-BioMed's own
backward/step. This keeps the step count that the lazy-regularisation lr/beta correction
(``k/(k+1)``, :mod:`.optim`) assumes, and the regular losses are never skipped. The reference
federated code instead *replaced* the regular step (docs/method.md#training-step item 6).

Conditioning: ``c = [one-hot(domain); one-hot(z-bin)]``; with probability ``clip_prob`` (0.5) the
batch is also conditioned on the node's ``clip_mean`` **repeated to the batch size** (FIX docs/differences.md#d9-4),
otherwise ``e = None``. Style mixing: with probability ``mixing`` two z are drawn (the shared model
pairs every z with the condition, FIX docs/differences.md#d9-5).
"""
from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch

from .ada import AdaptiveAugment, augment
from .config import EMA_DECAY, FactoryConfig
from .losses import d_logistic_loss, g_nonsaturating_loss, path_length_penalty, r1_penalty
from .network import FactoryModel
from .optim import AlternatingAdam
from .samples import generate_grid, save_grid

Reporter = Callable[[Dict[str, float], int], None]


def mixing_noise(batch: int, style_dim: int, prob: float, device: torch.device) -> List[torch.Tensor]:
    """One z, or two z with probability ``prob`` (style-mixing regularisation)."""
    if prob > 0 and float(torch.rand(())) < prob:
        return [torch.randn(batch, style_dim, device=device), torch.randn(batch, style_dim, device=device)]
    return [torch.randn(batch, style_dim, device=device)]


class FactoryTrainer:
    """Stateful step logic of one node. Persistable state: :meth:`state_dict` / :meth:`load_state_dict`.

    Args:
        model: the G/D/G_ema container being trained.
        optimizer: the alternating Adam facade over ``model.discriminator`` / ``model.generator``.
        cfg: factory hyper-parameters.
        clip_mean: (1, D) mean CLIP embedding of this node's domain, or None.
        clip_loss: callable ``(fake, target_rows) -> loss`` (frozen CLIP), needed if ``clip_weight > 0``.
        sample_dir: folder for the node's sample grids (None: no grids).
        reporter: called with (running-mean metrics, update index in the round) every ``log_every``.
    """

    def __init__(self, model: FactoryModel, optimizer: AlternatingAdam, cfg: FactoryConfig,
                 clip_mean: Optional[torch.Tensor] = None, clip_loss: Optional[Callable[..., torch.Tensor]] = None,
                 sample_dir: Optional[Path] = None, reporter: Optional[Reporter] = None):
        self.model, self.opt, self.cfg = model, optimizer, cfg
        self.clip_mean = None if clip_mean is None else clip_mean.reshape(1, -1).float()
        if self.clip_mean is not None and self.clip_mean.shape[1] != cfg.clip_dim:
            raise ValueError(f"clip_mean has width {self.clip_mean.shape[1]} but the model expects clip_dim="
                             f"{cfg.clip_dim}: prepare the data with the same CLIP model as --clip-dim")
        if cfg.clip_weight > 0 and self.clip_mean is not None and clip_loss is None:
            raise ValueError("clip_weight > 0 needs a CLIP model for the loss")
        self.clip_loss = clip_loss
        self.sample_dir = sample_dir
        self.reporter = reporter
        self.step = 0
        self.round_updates = 0
        self.mean_path_length = 0.0
        self.ada: Optional[AdaptiveAugment] = None
        if cfg.augment:
            self.ada = AdaptiveAugment(cfg.ada_target, cfg.ada_length, cfg.ada_every, p=cfg.augment_p)
        self.counts: Dict[str, int] = defaultdict(int)
        self._sums: Dict[str, float] = defaultdict(float)
        self._nums: Dict[str, int] = defaultdict(int)
        self._pending: Optional[Dict[str, Any]] = None

    # ------------------------------------------------------------------ state
    @property
    def adaptive(self) -> bool:
        return self.cfg.augment and self.cfg.augment_p == 0

    @property
    def ada_p(self) -> float:
        return 0.0 if self.ada is None else self.ada.p

    def state_dict(self) -> Dict[str, Any]:
        return {"step": self.step, "mean_path_length": self.mean_path_length,
                "ada": None if self.ada is None else self.ada.state_dict(),
                "optimizer": self.opt.state_dict(), "counts": dict(self.counts)}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Restore the persisted state. The optimizer part is applied at the first training step,
        once Fed-BioMed has moved the model to its training device."""
        self.step = int(state["step"])
        self.mean_path_length = float(state["mean_path_length"])
        if self.ada is not None and self.adaptive:
            self.ada.load_state_dict(state.get("ada"))
        self.counts.update({k: int(v) for k, v in state.get("counts", {}).items()})
        self._pending = state.get("optimizer")

    def _apply_pending_optimizer_state(self) -> None:
        if self._pending is None:
            return
        # keep this round's hyper-parameters (the researcher may change lr on resume)
        hyper = [(g["lr"], g["betas"]) for g in self.opt.param_groups]
        self.opt.load_state_dict(self._pending)
        for group, (lr, betas) in zip(self.opt.param_groups, hyper):
            group["lr"], group["betas"] = lr, betas
        self._pending = None

    # ------------------------------------------------------------------ step
    def conditions(self, target: torch.Tensor, device: torch.device) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """(c, e) for a batch of targets ``[domain, zbin]``; e is clip_mean repeated to the batch or None."""
        from model import make_condition

        target = target.reshape(-1, 2).long()
        c = make_condition(target[:, 0].cpu(), target[:, 1].cpu(), self.cfg.n_domains, self.cfg.n_zbins,
                           device=device)
        e = None
        if self.clip_mean is not None and float(torch.rand(())) < self.cfg.clip_prob:
            if target[:, 0].unique().numel() != 1:
                raise ValueError("a node's slices must share one domain label to be conditioned on its clip_mean")
            e = self.clip_mean.to(device).expand(target.shape[0], -1)
        return c, e

    def training_step(self, real: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """One update index; returns the loss Fed-BioMed back-propagates and steps."""
        if self._pending is not None:
            self._apply_pending_optimizer_state()
        device = real.device
        if self.sample_dir is not None and self.step % self.cfg.sample_every == 0:
            self.save_samples(real)
        c, e = self.conditions(target, device)
        if self.step % 2 == 0:
            loss = self._d_update(real, c, e)
        else:
            loss = self._g_update(c, e)
        self.step += 1
        self.round_updates += 1
        if self.reporter is not None and self.round_updates % self.cfg.log_every == 0:
            self.report()
        return loss

    def _set_phase(self, phase: str) -> None:
        self.opt.set_phase(phase)
        self.model.generator.requires_grad_(phase == "g")
        self.model.discriminator.requires_grad_(phase == "d")

    def _aug(self, images: torch.Tensor) -> torch.Tensor:
        return augment(images, self.ada_p, self.cfg.ada_rot90) if self.ada is not None else images

    def _d_update(self, real: torch.Tensor, c: torch.Tensor, e: Optional[torch.Tensor]) -> torch.Tensor:
        self._set_phase("d")
        cfg, g, d = self.cfg, self.model.generator, self.model.discriminator
        labels = (c, e)
        with torch.no_grad():
            fake, _ = g(mixing_noise(real.shape[0], cfg.style_dim, cfg.mixing, real.device), labels)
        real_pred, fake_pred = self._d_scores(real, fake, c, e)
        loss = d_logistic_loss(real_pred, fake_pred)
        if self.ada is not None and self.adaptive:
            self.ada.tune(real_pred)
        self.counts["d"] += 1
        self._track(d_loss=loss, real_score=real_pred.mean(), fake_score=fake_pred.mean(), ada_p=self.ada_p)
        if (self.step // 2) % cfg.d_reg_every != 0:
            return loss
        # lazy R1: regular step now, regulariser step by the framework
        loss.backward()
        self.opt.inner_step()
        real_r = real.detach().requires_grad_(True)
        pred = d(self._aug(real_r), labels)
        penalty = r1_penalty(pred, real_r)
        self.counts["r1"] += 1
        self._track(r1=penalty)
        return cfg.r1 / 2 * penalty * cfg.d_reg_every

    def _d_scores(self, real: torch.Tensor, fake: torch.Tensor, c: torch.Tensor,
                  e: Optional[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(D(aug(real)), D(aug(fake)))``. On the CPU fast paths (``model.fast_paths_enabled``) both
        batches go through D in one call (``batches=2``: the same scores, fewer and larger convolutions);
        the augmentations are drawn in the same order either way."""
        from model import fast_paths_enabled

        d, labels = self.model.discriminator, (c, e)
        if not (fast_paths_enabled() and real.device.type == "cpu" and real.shape == fake.shape):
            return d(self._aug(real), labels), d(self._aug(fake), labels)
        images = torch.cat([self._aug(real), self._aug(fake)])
        pair = (torch.cat([c, c]), None if e is None else torch.cat([e, e]))
        real_pred, fake_pred = d(images, pair, batches=2).chunk(2)
        return real_pred, fake_pred

    def _g_update(self, c: torch.Tensor, e: Optional[torch.Tensor]) -> torch.Tensor:
        self._set_phase("g")
        cfg, g, d = self.cfg, self.model.generator, self.model.discriminator
        self.model.update_ema(EMA_DECAY)  # before this update's step(s), as the original
        self.counts["ema"] += 1
        batch, device = c.shape[0], c.device
        fake, _ = g(mixing_noise(batch, cfg.style_dim, cfg.mixing, device), (c, e))
        loss = g_nonsaturating_loss(d(self._aug(fake), (c, e)))
        self._track(g_loss=loss)
        if cfg.clip_weight > 0 and e is not None and self.clip_loss is not None:
            clip = self.clip_loss(fake, e)  # un-augmented fake (FIX docs/differences.md#d9-9)
            loss = loss + cfg.clip_weight * clip
            self.counts["clip"] += 1
            self._track(clip_loss=clip)
        self.counts["g"] += 1
        if (self.step // 2) % cfg.g_reg_every != 0:
            return loss
        loss.backward()
        self.opt.inner_step()
        shrink = max(1, batch // cfg.path_batch_shrink)
        e_pl = None if e is None else e[:shrink]
        fake, latents = g(mixing_noise(shrink, cfg.style_dim, cfg.mixing, device), (c[:shrink], e_pl),
                          return_latents=True)
        penalty, self.mean_path_length, lengths = path_length_penalty(fake, latents, self.mean_path_length)
        self.counts["pl"] += 1
        self._track(path_loss=penalty, path_length=lengths.mean(), mean_path_length=self.mean_path_length)
        return cfg.path_regularize * cfg.g_reg_every * penalty

    # ------------------------------------------------------------------ reporting
    def _track(self, **values: Any) -> None:
        for key, value in values.items():
            self._sums[key] += float(value.detach()) if isinstance(value, torch.Tensor) else float(value)
            self._nums[key] += 1

    def metrics(self) -> Dict[str, float]:
        """Running means since the last report, plus the current step, ADA p and path-length mean."""
        out = {k: self._sums[k] / self._nums[k] for k in self._sums if self._nums[k]}
        out.update(step=float(self.step), ada_p=self.ada_p, mean_path_length=self.mean_path_length)
        if self.ada is not None:
            out["ada_r_t"] = self.ada.r_t
        return out

    def report(self) -> None:
        if self.reporter is not None and self._sums:
            self.reporter(self.metrics(), self.round_updates)
        self._sums.clear()
        self._nums.clear()

    @torch.no_grad()
    def save_samples(self, real: torch.Tensor) -> None:
        """``<sample_dir>/<step:07d>.png`` (G_ema on the fixed grid) and ``..._real.png``."""
        assert self.sample_dir is not None
        images = generate_grid(self.model.g_ema, self.cfg.n_sample, seed=self.cfg.seed)
        save_grid(images, self.sample_dir / f"{self.step:07d}.png", nrow=self.cfg.n_domains)
        save_grid(real, self.sample_dir / f"{self.step:07d}_real.png", nrow=max(1, min(8, real.shape[0])))
