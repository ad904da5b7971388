import torch, declarative as dl, time
n, B = 100, 1024
z, th = dl.Variable(n, name="z"), dl.Parameter(n, name="th")
layer = dl.Problem(dl.Maximize(th @ z + dl.sum(dl.entropy(z))), [dl.sum(z) == 1, z >= 0]).to_torch()
for scale in [1.0, 20.0]:
    T = scale * torch.randn(B, n, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    layer(th=T)
    t = time.perf_counter()
    for _ in range(3): layer(th=T)
    print(f"scale {scale}: {(time.perf_counter()-t)/3*1e3:.0f} ms, iters total {int(layer.info.iterations.sum())}, statuses {set(layer.info.status)}")
