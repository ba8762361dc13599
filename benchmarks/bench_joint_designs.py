"""Per-unit vs whole-layer (``joint_layers``) designs of the one-hidden-layer CNN, one process.

For the MNIST backdoor model (64 filters of 14 x 14, codes 48 per filter and 16 per class):
the time of one Adam training step (batch 128) with the designs as they are built (per-unit
designs drawn inside the traced step, whole-layer designs drawn once and used as constants)
beside whole-layer designs drawn inside the step (what every design did before), and the time
of the data-free recovery (``recover_designed``) of a readout with 30 edits in one column, per
column and as a whole.

    OPENBLAS_NUM_THREADS=1 python benchmarks/bench_joint_designs.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import optax

from jaxpurify import defenses
from jaxpurify.models import DesignedOneHiddenLayerCNN, design_matrix

sys.path.insert(0, str(Path(__file__).resolve().parent))
from timing import best_ms  # noqa: E402


class _DrawnEveryStep(DesignedOneHiddenLayerCNN):
    """Every design drawn by :func:`design_matrix` inside the traced function."""

    def designs(self, dtype=jnp.float32):
        out = {}
        for seed, (name, (rows, r, units)) in enumerate(self._layer_shapes().items(),
                                                          start=self.design_seed):
            if name in self.joint_layers:
                rows, r = units * rows, units * r
            out[name] = design_matrix(seed, rows, r, dtype)
        return out


def _step_ms(model, x, y, steps: int = 10) -> float:
    params = model.init(jax.random.PRNGKey(1), x[:1])["params"]
    opt = optax.adam(1e-3)

    @jax.jit
    def step(p, s):
        def loss(p):
            logits = model.apply({"params": p}, x)
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

        u, s = opt.update(jax.grad(loss)(p), s, p)
        return optax.apply_updates(p, u), s

    def run():
        p, s = params, opt.init(params)
        for _ in range(steps):
            p, s = step(p, s)
        return p

    return best_ms(run, 3) / steps


def main():
    x = jax.random.normal(jax.random.PRNGKey(0), (128, 28, 28, 1))
    y = jax.random.randint(jax.random.PRNGKey(2), (128,), 0, 10)
    kw = dict(num_classes=10, pool="mean")
    print("one-hidden MNIST CNN (64 filters 14x14, codes 48/16); ms per Adam step, batch 128")
    for joint in ((), ("readout",), ("conv", "readout")):
        model = DesignedOneHiddenLayerCNN(64, 14, 1, 48, 16, joint_layers=joint, **kw)
        row = f"  joint={joint!s:22s} {_step_ms(model, x, y):8.2f}"
        if joint:
            drawn = _DrawnEveryStep(64, 14, 1, 48, 16, joint_layers=joint, **kw)
            row += f"   drawn every step: {_step_ms(drawn, x, y, steps=3):8.2f}"
        print(row)
    print("recovery of 30 edits in one readout column (float32), ms (best of 3)")
    for joint in ((), ("readout",)):
        model = DesignedOneHiddenLayerCNN(64, 14, 1, 48, 16, joint_layers=joint, **kw)
        clean = model.materialize(model.init(jax.random.PRNGKey(1), x[:1])["params"])
        beta = clean["readout"]["kernel"]
        dirty = {**clean, "readout": {"kernel": beta.at[:30, 0].add(1.0)}}
        ms = best_ms(lambda m=model, d=dirty: defenses.recover_designed(m, d)[0], 3)
        _, report = defenses.recover_designed(model, dirty)
        r = report["readout"]
        print(f"  joint={joint!s:22s} {ms:8.1f}  certified={r['certified']}  "
              f"max row fraction {r['max_row_fraction']:.3f} "
              f"(threshold {r['critical_fraction']:.2f})")


if __name__ == "__main__":
    main()
