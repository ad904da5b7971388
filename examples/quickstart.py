"""Quick start: a batched QP layer in a few lines.

    python examples/quickstart.py

Builds  minimize 1/2 x'Qx + q'x  s.t.  Gx <= h, Ax = b  with every matrix a parameter,
prints the derived KKT system, solves a batch of 8 random instances in one call, checks
one against CVXPY if it is installed, and backpropagates through the solutions.
"""
import torch

import declarative as dl

torch.manual_seed(0)
n, m, p, B = 10, 6, 2, 8

# 1. the problem, symbolically
x = dl.Variable(n, name="x")
Q = dl.Parameter((n, n), name="Q")
q = dl.Parameter(n, name="q")
G = dl.Parameter((m, n), name="G")
h = dl.Parameter(m, name="h")
A = dl.Parameter((p, n), name="A")
b = dl.Parameter(p, name="b")
prob = dl.Problem(dl.Minimize(0.5 * dl.quad_form(x, Q) + q @ x), [G @ x <= h, A @ x == b])
print(prob.kkt())

# 2. one line to a torch module
layer = prob.to_torch()
print("\nlayer:", layer)

# 3. a batch of random, strictly feasible instances (Q is shared across the batch)
dtype = torch.float64
L = torch.randn(n, n, dtype=dtype)
Q_t = L @ L.T / n + 0.1 * torch.eye(n, dtype=dtype)
q_t = torch.randn(B, n, dtype=dtype, requires_grad=True)
G_t = torch.randn(B, m, n, dtype=dtype)
x0 = torch.randn(B, n, dtype=dtype)
h_t = (G_t @ x0.unsqueeze(-1)).squeeze(-1) + torch.rand(B, m, dtype=dtype)
A_t = torch.randn(B, p, n, dtype=dtype)
b_t = (A_t @ x0.unsqueeze(-1)).squeeze(-1)
h_t.requires_grad_()

x_star = layer(Q_t, q_t, G_t, h_t, A_t, b_t)
print("\nsolution of instance 0:", x_star[0].detach().numpy().round(4))
print(layer.info)

try:
    import cvxpy as cp

    xv = cp.Variable(n)
    ref = cp.Problem(
        cp.Minimize(0.5 * cp.quad_form(xv, cp.psd_wrap(Q_t.numpy())) + q_t[0].detach().numpy() @ xv),
        [G_t[0].numpy() @ xv <= h_t[0].detach().numpy(), A_t[0].numpy() @ xv == b_t[0].numpy()],
    )
    ref.solve()
    print(f"max |x - x_cvxpy| on instance 0: {abs(xv.value - x_star[0].detach().numpy()).max():.2e}")
except ImportError:
    print("(install cvxpy to compare with a reference solver)")

# 4. gradients through the argmin (implicit function theorem, nothing unrolled)
loss = x_star.square().sum()
loss.backward()
# h only matters through the active constraints: show the instance with the most
i = int((h_t.grad.abs() > 1e-12).sum(-1).argmax())
print(f"\nd loss / d q[{i}]:", q_t.grad[i].numpy().round(4))
print(f"d loss / d h[{i}]:", h_t.grad[i].numpy().round(4), "(zero on inactive constraints)")

# 5. the generated code is plain torch
print("\nfirst lines of the generated stationarity code:")
src = layer.source
start = src.index("def derivatives")
print("\n".join(src[start:].splitlines()[:12]))
