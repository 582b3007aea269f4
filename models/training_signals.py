"""Per-sample training signals of a segmentation network at one checkpoint (torch).

``checkpoint_maps`` runs the network (eval mode) over a whole preprocessed volume and returns, on that
volume's grid: the gradient of the label's log-likelihood with respect to the input image (what variance of
gradients is computed from), the per-voxel cross-entropy of the label, and the network's prediction. The
volume is padded to a multiple of ``multiple`` voxels for the network and cropped back.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def checkpoint_maps(network: torch.nn.Module, image: torch.Tensor, label: torch.Tensor, device=None,
                    multiple: int = 16) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``image``: (1, D, H, W) float; ``label``: (1, D, H, W) or (D, H, W) class indices 0..C-1.

    Returns ``(grad, ce, pred)`` as numpy arrays of shape (D, H, W).
    """
    device = device or next(network.parameters()).device
    img = torch.as_tensor(image, dtype=torch.float32).reshape(1, 1, *image.shape[-3:]).to(device)
    lab = torch.as_tensor(label).reshape(*image.shape[-3:]).long().to(device)
    shape = img.shape[-3:]
    pad = [(-s) % multiple for s in shape]
    # F.pad takes pairs from the last dimension backwards
    img_p = F.pad(img, (0, pad[2], 0, pad[1], 0, pad[0]))
    x = img_p.detach().clone().requires_grad_(True)
    was_training = network.training
    network.eval()
    try:
        with torch.enable_grad():
            logits = network(x)[..., : shape[0], : shape[1], : shape[2]].float()
            logp = F.log_softmax(logits, dim=1)[0]
            ll = logp.gather(0, lab[None]).squeeze(0)
            (grad,) = torch.autograd.grad(ll.sum(), x)
    finally:
        network.train(was_training)
    grad = grad[0, 0, : shape[0], : shape[1], : shape[2]]
    return (grad.detach().cpu().numpy().astype(np.float32), (-ll).detach().cpu().numpy().astype(np.float32),
            logp.argmax(0).detach().cpu().numpy().astype(np.int16))
