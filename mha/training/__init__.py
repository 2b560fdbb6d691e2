"""Training on numpy: an optimiser for the gradients of ``mha.vjp`` and a trainable attention-only decoder.

    opt = mha.training.Adam(1e-3, weight_decay=0.01, clip_norm=1.0)
    out, pull = mha.vjp(layer, x, causal=True)
    g = pull(d_out)
    layer.set_weights(opt.update(layer.weights, g.weights))

    model = mha.training.AttnOnlyDecoder.init(vocab_size=64, hidden_size=64, num_layers=2, num_heads=4,
                                              max_positions=64)
    loss, grads = model.loss_and_grads(ids, targets, mask)
    model.set_params(opt.update(model.params, grads))

examples/train_induction.py trains the shipped "induction" model with them.
"""

from ._decoder import AttnOnlyDecoder, check_config
from ._optim import Adam, global_norm

__all__ = ["Adam", "AttnOnlyDecoder", "check_config", "global_norm"]
