"""The demo's transformer (codegen/demo_transformer.py) in torch.nn, with a generated model's weights: the demo's
test trains both from the same weights, make bench times a training step of each."""
import numpy as np
import torch
from torch import nn


class TorchTransformer(nn.Module):
    """The demo's transformer of torch.nn modules, with the generated model's weights, in their dtype."""

    def __init__(self, model):
        super().__init__()
        E, H = model.token.weight.shape[1], model.attention.Wq.shape[0]
        mine, linears = model.attention, (*model.mlp.layers[::2], model.head)
        self.token, self.position = (nn.Embedding(*table.weight.shape) for table in (model.token, model.position))
        self.norm1, self.norm2, self.norm = (nn.LayerNorm(E) for _ in range(3))
        self.attention = nn.MultiheadAttention(E, H, batch_first=True)
        self.fc1, self.fc2, self.head = (nn.Linear(*linear.W.shape) for linear in linears)
        self.gelu = nn.GELU()   # a module, not F.gelu, so that codegen/bench/profile_transformer's hooks time it
        pairs = [(self.token.weight, model.token.weight), (self.position.weight, model.position.weight),
                 # in_proj_weight's rows h D + d are Wq[h, d, :], then Wk's, then Wv's; out_proj's columns h D + d
                 (self.attention.in_proj_weight, np.concatenate([mine.Wq, mine.Wk, mine.Wv]).reshape(3 * E, E)),
                 (self.attention.in_proj_bias, np.concatenate([mine.bq, mine.bk, mine.bv]).reshape(3 * E)),
                 (self.attention.out_proj.weight, mine.Wo.reshape(E, E)), (self.attention.out_proj.bias, mine.bo)]
        for norm, theirs in zip((self.norm1, self.norm2, self.norm), (model.norm1, model.norm2, model.norm)):
            pairs += [(norm.weight, theirs.gamma), (norm.bias, theirs.beta)]
        for linear, theirs in zip((self.fc1, self.fc2, self.head), linears):
            pairs += [(linear.weight, theirs.W.T), (linear.bias, theirs.b)]  # W is (in, out), torch's (out, in)
        self.to(getattr(torch, model.token.weight.dtype.name))
        with torch.no_grad():
            for param, value in pairs:
                param.copy_(torch.from_numpy(np.ascontiguousarray(value)))

    def forward(self, tokens):
        T = tokens.shape[1]
        x = self.token(tokens) + self.position(torch.arange(T))
        a = self.norm1(x)
        causal = torch.triu(torch.ones(T, T, dtype=torch.bool), diagonal=1)
        x = x + self.attention(a, a, a, attn_mask=causal, need_weights=False)[0]
        x = x + self.fc2(self.gelu(self.fc1(self.norm2(x))))
        return self.head(self.norm(x))


class TorchTransformerStep:
    """One Adam step of TorchTransformer on one batch: cross-entropy of the next token, ignored positions left out."""

    def __init__(self, model, tokens, targets, lr, ignored):
        self.net = TorchTransformer(model)
        self.optimizer = torch.optim.Adam(self.net.parameters(), lr=lr)
        self.tokens, self.targets = torch.from_numpy(tokens), torch.from_numpy(targets)
        self.ignored = ignored

    def step(self):
        logits = self.net(self.tokens)
        loss = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), self.targets.reshape(-1),
                                           ignore_index=self.ignored)
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()
        return loss.detach()
