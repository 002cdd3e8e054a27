# ---
# jupyter:
#   jupytext:
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 1. Autodiff in 60 lines
#
# **What you will learn.** How reverse-mode automatic differentiation works on arrays: every operation
# records its inputs and a rule that turns the gradient of its output into gradients of its inputs (a
# *vector-Jacobian product*); `backward()` visits the graph in reverse topological order and applies the rules.
# Then the same computation with `tm.Tensor`, and how to *check* a gradient against finite differences.
#
# **Prerequisites.** NumPy and the chain rule. Nothing from tinymoe yet.
#
# **Sources.** Reverse mode is the adjoint method of Linnainmaa (1970) and Griewank & Walther, *Evaluating
# Derivatives* (2008), ch. 3; the scalar version is Karpathy's *micrograd*. The check is the central difference
#
# $$\frac{\partial f}{\partial x_j} \approx \frac{f(x + \varepsilon e_j) - f(x - \varepsilon e_j)}{2\varepsilon},
# \qquad \text{error} = O(\varepsilon^2) + O(u\,|f| / \varepsilon)$$
#
# (truncation plus rounding, $u \approx 10^{-16}$ in float64), so $\varepsilon \approx 10^{-6}$ is a good choice.

# %%
import os
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np

import tinymoe as tm
from tinymoe.gradcheck import check_grad

FIGURES = Path(os.environ.get("TINYMOE_TUTORIAL_FIGURES", "figures"))
FIGURES.mkdir(parents=True, exist_ok=True)
rng = np.random.default_rng(0)


# %% [markdown]
# ## A tiny array autodiff, from scratch
#
# Each `Value` holds `data`, `grad`, its parents and a `_backward` closure. The closures below are the
# vector-Jacobian products of each op: for $c = a b$ (elementwise) $\bar a = \bar c\, b$; for $C = A B$
# (matrix product) $\bar A = \bar C B^\top$, $\bar B = A^\top \bar C$; for $c = \tanh a$,
# $\bar a = \bar c\,(1 - c^2)$; for $s = \sum a$, $\bar a = \bar s$ broadcast back.

# %%
class Value:
    def __init__(self, data, parents=()):
        self.data, self.grad, self.parents = np.asarray(data, dtype=np.float64), None, parents
        self._backward = lambda: None

    def _out(self, data, parents, backward):
        out = Value(data, parents)
        out._backward = lambda: backward(out.grad)
        return out

    def _acc(self, g):
        self.grad = g if self.grad is None else self.grad + g

    def __add__(self, other):  # same shapes only, to keep it short
        return self._out(self.data + other.data, (self, other), lambda g: (self._acc(g), other._acc(g)))

    def __mul__(self, other):
        return self._out(self.data * other.data, (self, other),
                         lambda g: (self._acc(g * other.data), other._acc(g * self.data)))

    def __matmul__(self, other):
        return self._out(self.data @ other.data, (self, other),
                         lambda g: (self._acc(g @ other.data.T), other._acc(self.data.T @ g)))

    def tanh(self):
        t = np.tanh(self.data)
        return self._out(t, (self,), lambda g: self._acc(g * (1 - t**2)))

    def sum(self):
        return self._out(self.data.sum(), (self,), lambda g: self._acc(g * np.ones_like(self.data)))

    def backward(self):
        order, seen = [], set()

        def visit(v):  # topological order: a node after all of its parents
            if id(v) not in seen:
                seen.add(id(v))
                for p in v.parents:
                    visit(p)
                order.append(v)

        visit(self)
        self.grad = np.ones_like(self.data)
        for v in reversed(order):
            v._backward()


# %% [markdown]
# A two-layer network's loss $L = \sum_{ij} o_{ij}^2$ with $o = \tanh(X W_1)\,W_2$. The output `out` is used
# twice in `out * out`, which is exactly where gradients must *accumulate* (`_acc`).

# %%
X, W1, W2 = rng.standard_normal((5, 4)), rng.standard_normal((4, 3)), rng.standard_normal((3, 2))

x, w1, w2 = Value(X), Value(W1), Value(W2)
out = x @ w1
out = out.tanh() @ w2
loss = (out * out).sum()
loss.backward()
print("our loss:", float(loss.data))

# %% [markdown]
# ## The same with `tm.Tensor`
#
# `tm.Tensor` has the same design (see `tinymoe/engine.py`: each op with its gradient right below it) plus
# broadcasting, indexing, reductions and a `no_grad` mode. float64 inputs stay float64.

# %%
tx = tm.Tensor(X)
tw1, tw2 = tm.Tensor(W1, requires_grad=True), tm.Tensor(W2, requires_grad=True)
tout = tx @ tw1
tout = tout.tanh() @ tw2
tloss = (tout * tout).sum()
tloss.backward()

diff_w1 = np.abs(tw1.grad - w1.grad).max()
diff_w2 = np.abs(tw2.grad - w2.grad).max()
print(f"tinymoe loss: {tloss.item():.12f}   ours: {float(loss.data):.12f}")
print(f"max |grad difference|: W1 {diff_w1:.2e}, W2 {diff_w2:.2e}")

# %% [markdown]
# ## Checking a gradient with finite differences
#
# A gradient you wrote by hand is a claim; the central difference is the test. We check one entry by hand for
# a range of $\varepsilon$ to see the two error terms: too large and the $O(\varepsilon^2)$ truncation wins, too
# small and rounding $O(u/\varepsilon)$ wins.

# %%
def loss_np(w1_):
    return float(((np.tanh(X @ w1_) @ W2) ** 2).sum())


eps_grid = np.logspace(-12, -1, 23)
errors = []
for eps in eps_grid:
    e = np.zeros_like(W1)
    e[0, 0] = eps
    numeric = (loss_np(W1 + e) - loss_np(W1 - e)) / (2 * eps)
    errors.append(abs(numeric - w1.grad[0, 0]))
errors = np.array(errors)
best_eps = eps_grid[np.argmin(errors)]
print(f"best eps {best_eps:.0e}, error there {errors.min():.1e}")

fig, ax = plt.subplots(figsize=(5, 3.2))
ax.loglog(eps_grid, errors, "o-")
ax.axvline(1e-6, color="gray", ls="--", label="eps = 1e-6 (check_grad's default)")
ax.set(xlabel="eps", ylabel="|finite difference − backward|", title="Central-difference error: rounding vs truncation")
ax.legend(fontsize=8)
fig.tight_layout()
fig.savefig(FIGURES / "01_fd_error.png", dpi=100)
plt.show()

# %% [markdown]
# `tinymoe.gradcheck.check_grad(fn, inputs)` does this for every element of every input (float64 only) and
# raises an `AssertionError` naming the worst element. `check_vjp` is the cheap version for big inputs: one
# random direction instead of every element. A checker is only useful if it can fail, so we also feed it a
# function whose gradient is deliberately wrong: `tanh` evaluated normally, but with the derivative of the
# identity (a *straight-through* trick) — the forward value is right, the gradient is not.

# %%
grads = check_grad(lambda a, b: (((tm.Tensor(X) @ a).tanh() @ b) ** 2).sum(), [W1, W2])
print("check_grad passed; max |grad − ours| =", max(np.abs(grads[0] - w1.grad).max(), np.abs(grads[1] - w2.grad).max()))


def wrong(a, b):
    h = tm.Tensor(X) @ a
    h = h + tm.Tensor(np.tanh(h.data) - h.data)  # value of tanh(h), gradient of h: wrong on purpose
    return ((h @ b) ** 2).sum()


try:
    check_grad(wrong, [W1, W2])
    caught = False
except AssertionError as err:
    caught = True
    print("caught:", str(err)[:160], "...")

# %% [markdown]
# ## What is now a tested fact

# %%
assert diff_w1 < 1e-12 and diff_w2 < 1e-12, "our autodiff and tm.Tensor disagree"
assert abs(tloss.item() - float(loss.data)) < 1e-12
assert 1e-9 <= best_eps <= 1e-3, "the finite-difference sweet spot should sit between rounding and truncation"
assert errors[0] > 1e3 * errors.min() and errors[-1] > 1e3 * errors.min(), "both ends of the V should be worse"
assert caught, "check_grad must reject a wrong gradient"
print("all checks passed")
