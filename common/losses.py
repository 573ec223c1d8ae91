"""Fine-tuning-evasion (FTE) losses, applied to the simulated fine-tuner's query predictions."""
import math

import torch
import torch.nn.functional as F


def kl_uniform(logits, labels=None):
    """KL(uniform || softmax(z)) = -log C - mean_c log p_c; zero iff the prediction is uniform."""
    log_p = F.log_softmax(logits.float(), dim=1)
    return (-math.log(logits.shape[1]) - log_p.mean(dim=1)).mean()


def inverse_ce(logits, labels):
    """The paper's inverse cross-entropy -log(1 - p_y): large when the fine-tuner gets the label right.

    log(1 - p_y) = log(sum_{c != y} p_c) = logsumexp(z_{c != y}) - logsumexp(z), finite even as p_y -> 1.
    """
    logits = logits.float()
    others = logits.scatter(1, labels.unsqueeze(1), float("-inf"))
    return (torch.logsumexp(logits, dim=1) - torch.logsumexp(others, dim=1)).mean()


def inverse_code(logits, labels):
    """The official code's variant: cross-entropy on (1 - logits), i.e. -log softmax(-z)_y."""
    return F.cross_entropy(1 - logits.float(), labels)


FTE_LOSSES = {"inverse": inverse_ce, "inverse_code": inverse_code, "kl": kl_uniform}


def fte_query_loss(fte, domain, device, channels_last):
    """FTS query loss of SOPHON: the FTE loss of the adapted model on the query images, against their labels."""

    def loss(net, x, y):
        return fte(net(domain.to_input(x, device, None, channels_last)), y.to(device, non_blocking=True))
    return loss
