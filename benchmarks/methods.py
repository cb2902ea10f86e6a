"""The ways of training n models that the suite compares. Each method is built from n models (which it
copies, never trains in place) and exposes ``step(x, y)`` (forward, backward, optimizer step),
``params()`` / ``grads()`` as {name: [n, *shape]} for the correctness check, and ``info`` (notes).

- sequential:          n models, n torch.optim.Adam (foreach default), one after another.
- sequential_compiled: the same, each model torch.compile'd.
- vmap:                torch.func: functional_call + grad + vmap over stacked parameters, one Adam over
                       the stacked tensors (Adam is elementwise, so this equals n Adams with the same lr).
- vmap_compiled:       the same with the vmap(grad(...)) function torch.compile'd.
- mbcompile:           mbcompile.batch(models) + mbcompile.optimizer(batched, Adam, lr=[...]).
- mbcompile_compiled:  mbcompile.batch(models, compile=True) + the same optimizer.
- mbcompile_step:      mbcompile.train_step with the same per-model optimizer: the whole step as one
                       Inductor program.
"""
from __future__ import annotations

import copy

import torch

LR = 1e-3


class Method:
    name = ""
    compiled = False

    def __init__(self, workload, models):
        self.workload, self.n, self.info = workload, len(models), {}
        self.names = [k for k, _ in models[0].named_parameters()]

    def step(self, x, y):
        raise NotImplementedError

    def settling(self):
        """Whether the first calls are still choosing how to run (not yet the steady step)."""
        return False

    def params(self):
        raise NotImplementedError

    def grads(self):
        raise NotImplementedError


class Sequential(Method):
    name = "sequential"

    def __init__(self, workload, models):
        super().__init__(workload, models)
        self.models = [copy.deepcopy(m) for m in models]
        self.opts = [torch.optim.Adam(m.parameters(), lr=LR) for m in self.models]
        self.fwd = [self.wrap(m) for m in self.models]

    def wrap(self, m):
        return m

    def step(self, x, y):
        for f, opt in zip(self.fwd, self.opts):
            opt.zero_grad()
            self.workload.loss(f(x), y).backward()
            opt.step()

    def params(self):
        return {k: torch.stack([m.get_parameter(k).detach() for m in self.models]) for k in self.names}

    def grads(self):
        return {k: torch.stack([m.get_parameter(k).grad for m in self.models]) for k in self.names}


class SequentialCompiled(Sequential):
    name, compiled = "sequential_compiled", True

    def wrap(self, m):
        return torch.compile(m)


class Vmap(Method):
    name = "vmap"

    def __init__(self, workload, models):
        super().__init__(workload, models)
        from torch.func import functional_call, grad, stack_module_state, vmap
        self.params_, self.buffers = stack_module_state(models)  # {name: [n, *shape]}
        base = copy.deepcopy(models[0])
        loss = workload.loss

        def loss_one(p, b, x, y):
            return loss(functional_call(base, (p, b), (x,)), y)

        self.fn = self.wrap(vmap(grad(loss_one), in_dims=(0, 0, None, None)))
        self.opt = torch.optim.Adam(list(self.params_.values()), lr=LR)

    def wrap(self, fn):
        return fn

    def step(self, x, y):
        grads = self.fn(self.params_, self.buffers, x, y)
        for k, p in self.params_.items():
            p.grad = grads[k]
        self.opt.step()

    def params(self):
        return {k: self.params_[k].detach() for k in self.names}

    def grads(self):
        return {k: self.params_[k].grad for k in self.names}


class VmapCompiled(Vmap):
    name, compiled = "vmap_compiled", True

    def wrap(self, fn):
        return torch.compile(fn)


class MBCompile(Method):
    name = "mbcompile"

    def __init__(self, workload, models):
        super().__init__(workload, models)
        import mbcompile
        self.mb = mbcompile
        self.batched = mbcompile.batch(models, compile=self.compiled)
        lrs = [LR] * self.n  # a list: per-model learning rates (all equal, to compare with vmap)
        self.opt = mbcompile.optimizer(self.batched, torch.optim.Adam, lr=lrs, compile=self.compiled)
        self.info["optimizer"] = "mbcompile.optimizer(Adam, lr=[per model])" + (", compile=True" if self.compiled
                                                                                 else "")

    def step(self, x, y):
        self.opt.zero_grad()
        self.mb.loss(self.workload.loss, self.batched(x), y, target_in_dim=None).sum().backward()
        self.opt.step()

    def params(self):
        named = dict(self.batched.named_parameters())
        return {k: named[k].detach() for k in self.names}

    def grads(self):
        named = dict(self.batched.named_parameters())
        return {k: named[k].grad for k in self.names}

    def times(self):
        """mbcompile's own capture / batching (/ compile) times of the last built program."""
        prog = getattr(self.batched, "_last_program", None)
        return dict(getattr(prog, "times", {}) or {})


class MBCompileCompiled(MBCompile):
    name, compiled = "mbcompile_compiled", True


class MBCompileStep(MBCompile):
    """mbcompile.train_step: forward, per-model loss, backward and the update of
    mbcompile.optimizer(batched, Adam, lr=[per model]) (the mbcompile method's optimizer) as ONE Inductor
    program. p.grad is not filled, so grads() for the correctness check is read back from Adam's first
    moment after the first step (exp_avg = (1 - beta1) * g, the per-model optimizer keeps torch's keys)."""
    name, compiled = "mbcompile_step", True

    def __init__(self, workload, models):
        Method.__init__(self, workload, models)
        import mbcompile
        self.batched = mbcompile.batch(models)
        self.opt = mbcompile.optimizer(self.batched, torch.optim.Adam, lr=[LR] * self.n)
        self.fn = mbcompile.train_step(self.batched, workload.loss, self.opt, target_in_dim=None)
        self.info["optimizer"] = ("mbcompile.train_step with mbcompile.optimizer(Adam, lr=[per model]), "
                                  "one compiled program")

    def step(self, x, y):
        self.fn(x, y)

    def settling(self):
        """Still timing its compiled and eager paths (path="auto" on the CPU): not yet the steady step."""
        return self.fn.path == "auto" and self.fn.chosen is None

    def grads(self):
        named = dict(self.batched.named_parameters())
        one_m_b1 = torch.tensor([1 - g["betas"][0] for g in self.opt.param_groups], dtype=torch.float64)
        st = self.opt.state

        def grad(p):
            if "exp_avg" not in st.get(p, {}):
                return None
            m = st[p]["exp_avg"]
            return m / one_m_b1.to(m.device, m.dtype).view(-1, *([1] * (m.dim() - 1)))
        return {k: grad(named[k]) for k in self.names}

    def times(self):
        return dict(self.fn.times)


METHODS = {m.name: m for m in [Sequential, SequentialCompiled, Vmap, VmapCompiled, MBCompile, MBCompileCompiled,
                               MBCompileStep]}
