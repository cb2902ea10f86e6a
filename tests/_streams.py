"""Each model run alone on its own random stream, continued across calls (what randomness="sequential"
promises: model i draws what it would draw alone after torch.manual_seed(seeds[i]))."""
import torch


class Streams:
    def __init__(self, seeds):
        self.states = [torch.manual_seed(s).get_state() for s in seeds]

    def run(self, i, fn, *args):
        """fn(*args) on model i's stream; the stream then continues from where fn left it."""
        torch.set_rng_state(self.states[i])
        out = fn(*args)
        self.states[i] = torch.get_rng_state()
        return out
