"""The training loss: each model's own causal-LM loss, computed only where there is something to learn.

Only positions with a target go through the output head (prompt tokens cost nothing there), in chunks that are
recomputed in backward instead of keeping the full logits, so memory stays flat in sequence length. The head is the
model's own head *module* (bias, LoRA or `modules_to_save` on it all work) followed by what the model's forward does
to its logits (`head_logits`). Because transformers has hundreds of architectures and that last step differs between
them, `check_loss` compares this loss with `model(..., labels=...)` on a real batch before the first step: a model
whose head does something new stops the run with both numbers instead of training on a silently wrong loss.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from . import cpuops
from .config import ConfigError
from .data import IGNORE


class LossModel(torch.nn.Module):
    """Backbone forward + the model's own head and cross-entropy, summed over trained positions.

    `fused=False` (`train.fused_loss=false`) runs the model's whole forward with labels instead: always exact, but it
    materialises logits for every position. Wrapping this module (not the bare model) in DDP/FSDP keeps gradient sync
    and parameter gathering working around our own forward.
    """

    def __init__(self, peft_model: torch.nn.Module, chunk: int, autocast_dtype: torch.dtype | None = None,
                 fused: bool = True) -> None:
        super().__init__()
        self.peft_model = peft_model
        self.chunk = chunk
        self.autocast_dtype = autocast_dtype
        self.fused = fused
        # what FSDP wraps one by one (its auto-wrap policy reads this from the root module it is given)
        self._no_split_modules = getattr(_causal(peft_model), "_no_split_modules", None)

    def forward(self, input_ids: torch.Tensor, targets: torch.Tensor, reference: bool = False,
                **kw: torch.Tensor) -> torch.Tensor:
        """Summed loss over the positions where `targets != IGNORE`. `reference=True`: the model's own forward."""
        causal = _causal(self.peft_model)
        with low_precision(self.peft_model, input_ids.device.type, self.autocast_dtype):
            if reference or not self.fused:
                # transformers' loss shifts labels itself; `shift_labels` takes our already-shifted targets as they are
                n = (targets != IGNORE).sum()
                out = causal(input_ids=input_ids, labels=targets, shift_labels=targets, use_cache=False, **kw)
                return out.loss.float() * n
            hidden = causal.get_decoder()(input_ids=input_ids, use_cache=False, **kw).last_hidden_state
            keep = targets != IGNORE
            h, t = hidden[keep], targets[keep]
            vocab = causal.config.get_text_config().vocab_size
            head = causal.get_output_embeddings()
            if not any(p.requires_grad for p in head.parameters()):  # LoRA's frozen head: gradients in the forward
                fast = _fast_ce(causal, h)
                return _HeadLoss.apply(h, t, causal, _rows_per_chunk(self.chunk, vocab, h.device, fast), fast)
            if h.shape[0] * vocab <= 64 * 2**20:  # a trained head, small: one shot, no recompute
                return _ce_sum(causal, h, t)
            return sum(checkpoint(_ce_sum, causal, h[i: i + self.chunk], t[i: i + self.chunk], use_reentrant=False)
                       for i in range(0, h.shape[0], self.chunk))


@contextlib.contextmanager
def low_precision(model: torch.nn.Module, device_type: str, dtype: torch.dtype | None) -> Iterator[None]:
    """Autocast to `dtype` (None: off) with peft's input casting off, for every forward of a model in training.

    fp32 LoRA weights on a bf16 base: peft would cast every activation to fp32 and back (17% of a CPU step); under
    autocast the small LoRA weights are cast instead and the activations stay bf16. A recompute in backward
    (checkpointing) runs outside this block with peft's casting on, and gives the same numbers: autocast casts
    the fp32 copy back to bf16 before each matmul."""
    from peft.helpers import disable_input_dtype_casting

    with disable_input_dtype_casting(model, active=dtype is not None), \
            torch.autocast(device_type, dtype=dtype or torch.bfloat16, enabled=dtype is not None):
        yield


def _causal(model: Any) -> Any:
    """The causal LM under a PEFT wrapper (LoRA), or the model itself (full fine-tuning)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def head_logits(causal: Any, h: torch.Tensor) -> torch.Tensor:
    """What `XForCausalLM.forward` does after the backbone, for the families transformers ships (read from its
    modeling files): the head module, then `_logit_steps`. Anything else is caught by `check_loss`."""
    logits = causal.get_output_embeddings()(h).float()
    for step in _logit_steps(causal):
        logits = step(logits)
    return logits


def _logit_steps(causal: Any) -> list[Callable[[torch.Tensor], torch.Tensor]]:
    """What a model does to its head's output (fp32): Cohere's `logit_scale`, Granite's `logits_scaling`, Falcon-H1's
    `lm_head_multiplier`, then Gemma-2/3's tanh softcapping; none for most models."""
    steps: list[Callable[[torch.Tensor], torch.Tensor]] = []
    cfg = causal.config
    if (scale := getattr(causal, "logit_scale", None)) is not None:  # cohere, cohere2
        steps.append(lambda x: x * scale)
    if logits_scaling := getattr(cfg, "logits_scaling", None):  # granite, granitemoe*
        steps.append(lambda x: x / logits_scaling)
    if (mult := getattr(getattr(causal, "model", None), "lm_head_multiplier", None)) is not None:  # falcon_h1
        steps.append(lambda x: x * mult)
    if cap := getattr(cfg, "final_logit_softcapping", None):  # gemma2, gemma3
        steps.append(lambda x: torch.tanh(x / cap) * cap)
    return steps


def _ce_sum(causal: Any, h: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(head_logits(causal, h), t, reduction="sum")


def _ce_and_grad(logits: torch.Tensor, t: torch.Tensor, need: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Summed cross-entropy of fp32 `logits` and (`need`) its gradient `softmax - onehot(t)`, written out instead of
    taken through `F.cross_entropy`'s backward, which zero-fills a gradient as large as the logits, scatters into
    it and reads the log-softmax back: at 64 x 49,152 logits 2.2 ms against 5.6 (the gradient is the log-softmax,
    exponentiated in place)."""
    logp = torch.log_softmax(logits, -1)
    loss = -logp.gather(1, t[:, None]).sum()
    if not need:
        return loss, None
    grad = logp.exp_()
    grad[torch.arange(t.shape[0], device=t.device), t] -= 1
    return loss, grad


def _rows_per_chunk(most: int, vocab: int, device: torch.device, kernel: bool) -> int:
    """On a CPU, chunks whose fp32 logits fit in ~12 MB: their softmax then runs in cache, not at the ~6 GB/s a
    2-core VM streams from memory (49k vocab: 64 rows; head + CE of a quickstart step 119 -> 94 ms). With
    finetune/cpuops.py's cross-entropy (`kernel`), which works a row at a time in cache, chunks of ~32 MB of bf16
    logits (341 rows): fewer passes over the head's weight. A GPU wants large matmuls: `train.loss_chunk_size` rows."""
    if device.type != "cpu":
        return most
    return max(16, min(most, (32 * 2**20 // (2 * vocab)) if kernel else 12 * 2**20 // (4 * vocab)))


def _fast_ce(causal: Any, h: torch.Tensor) -> bool:
    """Whether the head's cross-entropy goes to finetune/cpuops.py: bf16 on a CPU with AVX-512, and a head whose
    logits the model uses as they come (`_logit_steps` empty)."""
    if h.device.type != "cpu" or h.dtype != torch.bfloat16 or _logit_steps(causal):
        return False
    head = causal.get_output_embeddings()
    if getattr(head, "weight", None) is None or head.weight.dtype != torch.bfloat16 or (
            torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") != torch.bfloat16):
        return False
    return cpuops.why_not() is None


class _HeadLoss(torch.autograd.Function):
    """Output head + cross-entropy summed over chunks of trained positions, each chunk's gradient taken as soon as
    its logits exist (what Liger's fused linear cross-entropy does, here through the model's own head and
    `head_logits`, so softcapping and scales need nothing new). One chunk of logits is alive at a time and nothing
    is recomputed in backward, which only scales the stored gradient. For frozen heads (LoRA): a trained head's
    gradient would have to be carried the same way, and goes through `_ce_sum` instead. `fast` (`_fast_ce`): the
    cross-entropy and its bf16 gradient from finetune/cpuops.py, in larger chunks (head + CE of a 290-row step 78 ->
    35 ms)."""

    @staticmethod
    def forward(ctx: Any, h: torch.Tensor, t: torch.Tensor, causal: Any, rows: int, fast: bool) -> torch.Tensor:
        need = bool(ctx.needs_input_grad[0])
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        # fp32: fp16 training scales the loss in backward (GradScaler), so unscaled fp16 gradients could underflow
        grad = torch.empty(h.shape, dtype=torch.float32, device=h.device) if need else None
        for i in range(0, h.shape[0], rows):
            hc = h[i: i + rows].detach().requires_grad_(need)
            with torch.set_grad_enabled(need):
                logits = causal.get_output_embeddings()(hc) if fast else head_logits(causal, hc)
            # fast: the same sums from the bf16 logits, the gradient in the bf16 the head's matmul takes
            ce = cpuops.cross_entropy if fast else _ce_and_grad
            loss, grad_logits = ce(logits.detach(), t[i: i + rows], need)
            if grad is not None:
                grad[i: i + rows] = torch.autograd.grad(logits, hc, grad_logits)[0]
            total += loss
        ctx.dtype = h.dtype
        ctx.save_for_backward(grad)
        return total

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor | None, None, None, None, None]:
        (grad,) = ctx.saved_tensors
        return (grad * g).to(ctx.dtype) if grad is not None else None, None, None, None, None


@torch.no_grad()
def check_loss(loss_model: torch.nn.Module, inputs: dict[str, torch.Tensor], model_name: str,
               rtol: float) -> tuple[float, float]:
    """Our loss vs the model's own on one batch; raise (naming the model and both numbers) if they differ.

    Run on every rank with the same batch (FSDP gathers parameters inside forward, so all ranks must call it).
    """
    n = max(1, int((inputs["targets"] != IGNORE).sum()))
    was_training = loss_model.training
    loss_model.eval()  # no dropout: both forwards see the same network (and draw no random numbers)
    ours = float(loss_model(**inputs)) / n
    theirs = float(loss_model(**inputs, reference=True)) / n
    loss_model.train(was_training)
    if not math.isfinite(theirs):  # e.g. fp16 overflow: the loop stops on it with the precision's own message
        return ours, theirs
    if not abs(ours - theirs) <= rtol * max(1.0, abs(theirs)):
        raise ConfigError(
            f"{model_name}: tunesmith's fused loss on the first batch is {ours:.5f} but the model's own loss "
            f"(model(input_ids, labels=...)) is {theirs:.5f}. This architecture changes its logits in a way the fused "
            "head does not reproduce, so training would optimise the wrong loss. Set train.fused_loss=false to train "
            "through the model's own forward (exact, more memory), and please report the model."
        )
    return ours, theirs
