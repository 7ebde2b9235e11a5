"""The last-token completion's residual with the output layer's part by hand (an addition for speed, issue 18).

``last_token._residual`` subtracts from the output-embedding update what the recovered prefixes explain: the
FedSGD gradient of the kit's per-sequence-mean next-token loss over every known target plus the softmax term of
each sentence's last position, with respect to the (tied) output embedding ``W``. Through autograd that is a
forward to the logits of every packed slot, ``log_softmax`` / ``logsumexp`` on gathered copies of them, and a
backward whose output layer accumulates a dense ``[V, d]`` input-side gradient (zero-filled, then added to the
output side's) and zero-fills ``[R, T, V]`` gradients of the two gathers.

Here the forward stops at the output layer's input ``h`` (its graph kept, as before, for the candidates' terms),
and with ``H`` the ``M`` rows of the slots that predict something (known targets, then each sentence's last
position; padding slots left out):

* ``P = softmax(H W^T)`` row by row, scaled by ``c = 1 / (len_i denom)`` of the row's sentence, less ``c`` at each
  known target: the loss's gradient with respect to the logits, ``dZ`` [M, V];
* the output side ``dZ^T H`` and ``dH = dZ W``, two products;
* the input side from one backward of ``dH`` from ``H`` to the word embeddings, added to the rows of the
  sentences' tokens (a few hundred rows, not a dense ``[V, d]``).

The residual is the update less both sides, subtracted in float64. The same quantity as autograd's up to float32
round-off (the logits are a product over fewer rows, the softmax is formed directly and the two sides are not
summed in float32 first; tested). Only for output layers that are a plain bias-free ``nn.Linear`` whose output the
model returns as its logits (GPT-2, Llama; ``supported``)."""
from __future__ import annotations

import torch
from torch import Tensor, nn

from common.types import Observation

from .span import _Stop, model_device

#: model classes whose logits are ``lm_head(hidden)`` with nothing applied after (no scale, no soft-capping)
PLAIN_HEADS = frozenset({"GPT2LMHeadModel", "LlamaForCausalLM"})


def supported(model: nn.Module, out_emb: nn.Module) -> bool:
    """True when the model's logits are ``out_emb(h)`` for a bias-free ``nn.Linear`` (``PLAIN_HEADS``)."""
    return (type(model).__name__ in PLAIN_HEADS and type(out_emb) is nn.Linear and out_emb.bias is None
            and getattr(getattr(model, "config", None), "final_logit_softcapping", None) is None)


def packed_residual(obs: Observation, model: nn.Module, out_emb: nn.Module, update: Tensor,
                    sents: list[list[int]]):
    """``last_token._residual(..., exact=True, packed=True)`` with the output layer by hand (module docstring):
    the residual [V, d] (float64), the last hidden states [n, d] (float64), the loss denominator and the
    packed forward's ``Graph``."""
    from .last_token import Graph, _known_slots, _loss_denom, _packed_rows

    w = out_emb.weight.detach()
    dev = model_device(model)
    n = len(sents)
    ids, pos, mask, rows, offs, lens = _packed_rows(model, sents)
    inputs = {"attention_mask": mask, "position_ids": pos}
    store: list[Tensor] = []

    def hook(_m, args):
        store.append(args[0])
        raise _Stop

    h = out_emb.register_forward_pre_hook(hook)
    with torch.enable_grad():
        e = model.get_input_embeddings()(ids)  # the word embeddings, in the graph (their gradient: the input side)
    try:
        with torch.enable_grad():
            model(inputs_embeds=e, **inputs)
    except _Stop:
        pass
    finally:
        h.remove()
    hid = store[0]  # [R, T, d]
    per, col = _known_slots(offs, lens)  # the sentence and column of each known-target slot
    last = offs + lens - 1
    hk = torch.cat([hid[rows[per], col], hid[rows, last]])  # [M, d]: known-target slots, then last slots
    denom = _loss_denom(obs, n)
    coef = 1.0 / (lens.to(torch.float64) * denom)  # d loss / d logit scale of each sentence's rows
    row_coef = torch.cat([coef[per], coef]).to(hid.dtype)  # [M]
    n_known = int(per.numel())
    with torch.no_grad():
        hd = hk.detach()
        dz = torch.nn.functional.linear(hd, w)  # [M, V] logits
        dz = torch.softmax(dz, dim=-1).mul_(row_coef.unsqueeze(1))
        tgt = ids[rows[per], col + 1]
        dz[torch.arange(n_known, device=dev), tgt] -= row_coef[:n_known]  # the known targets' one-hot part
        dh = dz @ w  # [M, d]
        g = update.detach().to(torch.float64).cpu()
        g.sub_((dz.t() @ hd).cpu())  # the output side
    with torch.enable_grad():
        (ge,) = torch.autograd.grad(hk, [e], grad_outputs=dh, retain_graph=True)  # [R, T, d]
    with torch.no_grad():
        slot_r = torch.repeat_interleave(rows, lens)
        slot_c = torch.cat([torch.arange(int(o), int(o) + int(k), device=dev) for o, k in zip(offs, lens)])
        g.index_add_(0, ids[slot_r, slot_c].cpu(), ge[slot_r, slot_c].cpu().to(torch.float64), alpha=-1.0)  # input side
    graph = Graph(hid, e, rows, offs, lens, inputs)
    return g, hid[rows, last].detach().to(torch.float64).cpu(), denom, graph
