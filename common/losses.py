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


def entropy_gap(logits, labels=None):
    """log C - H(softmax(z)), mean over the batch: zero iff the prediction is uniform, like kl_uniform, but
    bounded by log C and with gradients that vanish as p approaches uniform from any side. Maximising the
    entropy is TAR's tamper-resistance loss (Tamirisa et al. ICLR'25): unlike negated cross-entropy or KL,
    it flattens the attacker's loss rather than pushing it up until just after the simulated horizon."""
    log_p = F.log_softmax(logits.float(), dim=1)
    return (math.log(logits.shape[1]) + (log_p.exp() * log_p).sum(dim=1)).mean()


FTE_LOSSES = {"inverse": inverse_ce, "inverse_code": inverse_code, "kl": kl_uniform, "entropy": entropy_gap}


def fte_query_loss(fte, domain, device, channels_last):
    """FTS query loss of SOPHON: the FTE loss of the adapted model on the query images, against their labels."""

    def loss(net, x, y):
        return fte(net(domain.to_input(x, device, None, channels_last)), y.to(device, non_blocking=True))
    return loss
