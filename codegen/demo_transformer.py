"""symgrad demo's transformer scene: a one-block causal transformer of generated layers learns to reverse 8 digits.

A sequence is 8 random digits, a separator and the digits reversed; the network reads it left to right and is
trained to predict each next token of the reversed half (teacher forcing), then writes the reversed half of
held-out sequences itself, one token at a time from its own predictions. Output t must copy input 15 - t: only
attention, with the learned positions, can fetch it. The layers, the loss and Adam are `generated` classes; the glue
here adds the embeddings and the residuals and passes the gradients back along the same paths, in NumPy alone.
"""
import json
import sys
import time
from dataclasses import asdict, dataclass

import numpy as np

import generated
from codegen.demo import Progress
from generated import Adam, ScaledDotProductAttention, Sequential, SoftmaxCrossEntropy

DIGITS, LENGTH = 10, 8
SEPARATOR = DIGITS
VOCABULARY = DIGITS + 1
# the network reads every token but the last; positions LENGTH..2 LENGTH - 1 predict the reversed digits
CONTEXT = 2 * LENGTH
# SoftmaxCrossEntropy's (and torch's) default ignore_index: the digits to reverse are given, not predicted
IGNORED = -100


@dataclass(frozen=True)
class Config:
    width: int = 32
    heads: int = 4
    steps: int = 150
    batch: int = 64
    lr: float = 3e-3
    train_size: int = 10_000
    test_size: int = 1_000
    evaluate_every: int = 15
    seed: int = 0


def sequences(rng, count):
    """(count, 2 LENGTH + 1) token rows: LENGTH random digits, the separator, the digits reversed."""
    digits = rng.integers(0, DIGITS, (count, LENGTH))
    return np.concatenate([digits, np.full((count, 1), SEPARATOR), digits[:, ::-1]], axis=1)


def split(config):
    """(train, test) sequences; no test sequence is among the training ones."""
    rng = np.random.default_rng(config.seed)
    train, test = sequences(rng, config.train_size), sequences(rng, config.test_size)
    as_number = DIGITS ** np.arange(LENGTH)
    seen = np.isin(test[:, :LENGTH] @ as_number, train[:, :LENGTH] @ as_number)
    return train, test[~seen]


def inputs_and_targets(rows):
    """(tokens, targets): every token but the last, and the next token where it is a reversed digit, else IGNORED."""
    targets = rows[:, 1:].copy()
    targets[:, :LENGTH] = IGNORED
    return rows[:, :-1], targets


class Transformer:
    """Token and position embeddings, one pre-norm block (causal multi-head attention, a GELU MLP, each added to
    the residual stream), a final LayerNorm and a linear head to the logits of the next token."""

    def __init__(self, config, dtype=np.float64, package=generated):
        """Each layer is package's class where it has one (generated.fast: the fused LayerNorm and GELU), else
        generated's; the weights are the same whichever."""
        rng, E, kept = np.random.default_rng(config.seed), config.width, {"dtype": dtype}
        Embedding, LayerNorm, MultiheadAttention, Linear, GELU = (
            getattr(package, name, None) or getattr(generated, name)
            for name in ("Embedding", "LayerNorm", "MultiheadAttention", "Linear", "GELU"))
        self.token = Embedding(VOCABULARY, E, rng=rng, **kept)
        self.position = Embedding(CONTEXT, E, rng=rng, **kept)
        self.norm1 = LayerNorm(E, **kept)
        self.attention = MultiheadAttention(E, config.heads, is_causal=True, rng=rng, **kept)
        self.norm2 = LayerNorm(E, **kept)
        self.mlp = Sequential([Linear(E, 4 * E, rng=rng, **kept), GELU(), Linear(4 * E, E, rng=rng, **kept)])
        self.norm, self.head = LayerNorm(E, **kept), Linear(E, VOCABULARY, rng=rng, **kept)
        self.layers = (self.token, self.position, self.norm1, self.attention, self.norm2, *self.mlp.layers,
                       self.norm, self.head)

    def parameters(self):
        """[(layer, name)] of every parameter, as Sequential.parameters gives them."""
        return [(layer, name) for layer in self.layers for name in getattr(layer, "params", ())]

    def forward(self, tokens):
        """Logits (N, T, VOCABULARY) of the next token after each of tokens (N, T)."""
        x = self.token.forward(tokens) + self.position.forward(np.arange(tokens.shape[1]))
        a = self.norm1.forward(x)
        x = x + self.attention.forward(a, a, a)
        x = x + self.mlp.forward(self.norm2.forward(x))
        return self.head.forward(self.norm.forward(x))

    def backward(self, g):
        """Sets every parameter's gradient from g, the logits' gradient; a residual's gradient is the sum of both
        paths', the position table's the sum over the batch."""
        g = self.norm.backward(self.head.backward(g))
        g = g + self.norm2.backward(self.mlp.backward(g, input_grad=True))
        dquery, dkey, dvalue = self.attention.backward(g)
        g = g + self.norm1.backward(dquery + dkey + dvalue)
        self.token.backward(g)
        self.position.backward(g.sum(axis=0))

    def attention_map(self, tokens):
        """P[h, t, s]: how much query t of one sequence reads key s in head h. MultiheadAttention does not return
        its weights (nn.MultiheadAttention's need_weights), so its projections are redone here and the generated
        causal ScaledDotProductAttention applied to the identity as values, whose output is then P itself."""
        x = self.token.forward(tokens) + self.position.forward(np.arange(len(tokens)))
        a, layer = self.norm1.forward(x), self.attention
        q = np.einsum("hde,te->htd", layer.Wq, a) + layer.bq[:, None]
        k = np.einsum("hde,se->hsd", layer.Wk, a) + layer.bk[:, None]
        identity = np.tile(np.eye(len(tokens)), (len(q), 1, 1))
        return ScaledDotProductAttention(is_causal=True).forward(q, k, identity)


def generate(model, prompts):
    """The LENGTH tokens after each prompt (N, LENGTH + 1), each the argmax given the prompt and those before it."""
    tokens = prompts
    for _ in range(LENGTH):
        tokens = np.concatenate([tokens, model.forward(tokens)[:, -1].argmax(axis=1)[:, None]], axis=1)
    return tokens[:, prompts.shape[1]:]


def scored(model, loss, rows):
    """(loss, logits, per-token accuracy) of the model's next-token predictions of the reversed halves of rows,
    each made from the true tokens before it (teacher forcing)."""
    tokens, targets = inputs_and_targets(rows)
    logits = model.forward(tokens)
    kept = targets != IGNORED
    value = float(loss.forward(logits.reshape(-1, VOCABULARY), targets.reshape(-1)))
    return value, logits, float(np.mean(logits.argmax(axis=2)[kept] == targets[kept]))


def training_batches(config, train):
    """The row indices of each step's batch: the training set in a new order each epoch."""
    shuffle = np.random.default_rng(config.seed + 1)
    order = np.empty(0, int)
    for _ in range(config.steps):
        if len(order) < config.batch:
            order = np.concatenate([order, shuffle.permutation(len(train))])
        rows, order = order[:config.batch], order[config.batch:]
        yield rows


def evaluate(model, loss, test, step):
    """The held-out loss and per-token accuracy at step, teacher forcing."""
    test_loss, _, test_accuracy = scored(model, loss, test)
    return dict(step=step, test_loss=test_loss, test_accuracy=test_accuracy)


def train(config, progress):
    """Adam on teacher-forced batches: the model, and its figures: the loss of every step, the held-out loss and
    accuracy every evaluate_every steps, and at the end the held-out reversed halves the model writes itself.
    One BLAS thread: the matrices are small, and a second thread gains little alone but costs much on a busy
    machine."""
    from threadpoolctl import threadpool_limits
    train_set, test = split(config)
    model, loss = Transformer(config), SoftmaxCrossEntropy(ignore_index=IGNORED)
    optimizer = Adam(model.parameters(), lr=config.lr)
    start = time.perf_counter()
    with threadpool_limits(1, user_api="blas"):
        losses, evaluations = [], [evaluate(model, loss, test, 0)]
        for step, rows in enumerate(training_batches(config, train_set), 1):
            value, logits, accuracy = scored(model, loss, train_set[rows])
            model.backward(loss.backward().reshape(logits.shape))
            optimizer.step()
            losses.append(value)
            if step % config.evaluate_every == 0 or step == config.steps:
                evaluations.append(evaluate(model, loss, test, step))
            progress.update(f"transformer step {step}/{config.steps}", step, config.steps, value, accuracy)
        correct = generate(model, test[:, :LENGTH + 1]) == test[:, LENGTH + 1:]
    history = dict(train_loss=losses, **{key: [e[key] for e in evaluations] for key in evaluations[0]})
    return model, dict(label="transformer, reversing 8 digits", seconds=time.perf_counter() - start,
                       token_accuracy=float(correct.mean()), sequence_accuracy=float(correct.all(axis=1).mean()),
                       test_loss=history["test_loss"][-1], teacher_forced_accuracy=history["test_accuracy"][-1],
                       history=history)


def plot_training(result, config, path):
    from matplotlib.figure import Figure
    history, last = result["history"], len(result["history"]["train_loss"])
    figure = Figure(figsize=(9, 3.6), layout="constrained")
    losses, accuracies = figure.subplots(1, 2)
    losses.plot(np.arange(1, last + 1), history["train_loss"], linewidth=0.8, label="training batch")
    losses.plot(history["step"], history["test_loss"], marker=".", label="held-out sequences")
    losses.set(yscale="log", xlabel="step", ylabel="cross-entropy (log scale)", title="Loss of the next token")
    accuracies.plot(history["step"], history["test_accuracy"], marker=".", label="per token, teacher forcing")
    accuracies.plot([last], [result["token_accuracy"]], "o", markersize=9,
                    label=f"per token, model-written: {result['token_accuracy']:.3f}")
    accuracies.plot([last], [result["sequence_accuracy"]], "s",
                    label=f"sequences, model-written: {result['sequence_accuracy']:.3f}")
    accuracies.axhline(1 / DIGITS, color="grey", linestyle=":", label="chance")
    accuracies.set(xlabel="step", ylabel="held-out accuracy", ylim=(0, 1.02), title="Held-out reversed digits")
    losses.legend(fontsize="small")
    accuracies.legend(loc="center right", bbox_to_anchor=(1, 0.35), fontsize="small")
    figure.suptitle(f"One-block causal transformer (width {config.width}, {config.heads} heads) reversing {LENGTH} "
                    f"digits, Adam lr {config.lr}, batch {config.batch}", fontsize="medium")
    figure.savefig(path, dpi=100)


def plot_attention(model, sequence, path):
    from matplotlib.figure import Figure
    tokens = sequence[:-1]
    weights = model.attention_map(tokens)
    labels = ["|" if token == SEPARATOR else str(token) for token in sequence]
    figure = Figure(figsize=(3 * len(weights), 3.7), layout="constrained")
    for head, (axes, head_weights) in enumerate(zip(figure.subplots(1, len(weights)), weights)):
        axes.imshow(head_weights, cmap="Blues", vmin=0, vmax=1)
        axes.set_xticks(range(len(tokens)), labels[:-1], fontsize="x-small")
        axes.set_yticks(range(len(tokens)), labels[:-1], fontsize="x-small")
        axes.set(title=f"head {head + 1}", xlabel="key")
    figure.axes[0].set_ylabel("query (predicts the next token)")
    figure.suptitle(f"Causal attention of each head on the held-out sequence {' '.join(labels)}: a query after the "
                    f"separator reads the digit it is to write next", fontsize="medium")
    figure.savefig(path, dpi=100)


def run(config, out):
    """Train the transformer, write transformer_training.png, transformer_attention.png and
    transformer_results.json to out."""
    model, result = train(config, Progress(sys.stderr))
    train_set, test = split(config)
    out.mkdir(parents=True, exist_ok=True)
    plot_training(result, config, out / "transformer_training.png")
    plot_attention(model, test[0], out / "transformer_attention.png")
    report = dict(config=asdict(config), train_size=len(train_set), test_size=len(test), result=result)
    (out / "transformer_results.json").write_text(json.dumps(report, indent=2) + "\n")
    return result


def summary(result):
    """One line: the held-out accuracies, the final test loss and the training time (evaluations included)."""
    return (f"{result['label']:<30} per-token accuracy {result['token_accuracy']:.4f}  whole sequences "
            f"{result['sequence_accuracy']:.4f}  test loss {result['test_loss']:.4f}  {result['seconds']:.1f} s")

