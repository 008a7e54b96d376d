"""The numba backend of an index-notation operation: its forward and backward assignments (the same SymPy
results codegen.tensor_lower lowers to whole-array NumPy) printed as fused loops.

The scheme fits an operation whose arrays are indexed by a row index r plus inner indices I, the same for every
full array, with at least one of I after r (LayerNorm's and RMSNorm's n and k, BatchNorm2d's c and n, h, w; the
inner indices after r, the arrays' last axes, one loop where they are more than one): an assignment is full
(over r and I: written in a loop over I), per row (over r: a local of the row, stored if returned) or a
sum over rows (over some of I: a param's gradient). A sum over I is a row reduction, an accumulator of
the loop over I held in cache; a sum over r is a partial sum per chunk of rows, the chunks added in order
once every row is done. Per row of numba.prange (per chunk where a kernel sums over rows), each loop
computes the reductions of its level (reading only values known before it), writes the full outputs and
adds to the partial sums that need nothing later; the per-row values they give come between the loops.
A per-row subexpression of a full one is a local computed once per row, before the loop that reads it.
Every number is in the input's dtype T, as codegen.fused prints it. A kernel outside the scheme raises
FusionError, and its module keeps the NumPy kernel."""
import numpy as np
import sympy as sp

from codegen.fused import FusedPrinter, FusionError
from codegen.tensor_lower import Maximum, factor_saved, fresh, module_context, names_of, program_of, rewritten
from codegen.tensor_verify import sample
from codegen.verify import AGREEMENT, GradientCheck
from derive.tensor import Sum, reads_of, size_of, with_flags

# chunks of rows a kernel with a sum over rows splits the rows into, each with its partial sums: a fixed
# count, so that the sums (and so the results) do not depend on how many threads numba runs
CHUNKS = 64
# numba's division raises ZeroDivisionError by default, a branch that also keeps the loops scalar; NumPy's
# model gives inf and NaN, as the NumPy kernels do
ERROR_MODEL = "numpy"
# the names the kernels give their own variables, which no array, size or option may take
OWN_NAMES = ("T", "chunk", "chunks", "numba")


def row_scheme(op):
    """(r, I): the row index and the inner indices, in the output's order; FusionError where op has no such form."""
    unfused = [what for what, present in (("noise", op.noise), ("a window", op.window), ("a penalty", op.penalty),
                                          ("targets", op.targets), ("a loss", op.kind != "layer")) if present]
    if unfused:
        raise FusionError(f"it has {unfused[0]}")
    full = op.steps[-1].indices
    rows = {i for s in op.steps if 0 < len(s.indices) < len(full) for i in s.indices}
    (r,) = rows if len(rows) == 1 else (op.batch_index,) if not rows else (None,)
    if r is None or r not in full:
        raise FusionError("its steps have no single row index (per-row steps over one index of the output)")
    # the axes after the rows' (BatchNorm2d's h, w after c), but the optional last one an input may lack: the
    # innermost loop runs over them, along a row's contiguous stretch; with none it would step a row's stride
    # (BatchNorm1d on (N, C): 7x slower than NumPy at (8192, 1024), where on (64, 32, 512) it is 3x faster)
    if len(full) - full.index(r) - 1 - bool(op.optional_axis) < 1:
        lacking = f" where {op.optional_axis[0]} lacks its optional last axis" if op.optional_axis else ""
        raise FusionError(f"its rows (over {r}) are the arrays' last axis{lacking}: a row's entries are strided")
    outside = [a for a, axes in op.inputs.items() if not set(axes) <= set(full)]
    if outside:  # attention's keys: an axis the output has not
        raise FusionError(f"its input {outside[0]} is over {', '.join(map(str, op.inputs[outside[0]]))}, indices the "
                          f"output's rows ({', '.join(map(str, full))}) have not")
    clash = sorted(set(OWN_NAMES) & names_of(op))
    if clash:
        raise FusionError(f"the name {clash[0]} is the fused kernels' own")
    return r, tuple(i for i in full if i != r)


def programs(op):
    """(forward steps, {function name: its assignments}) of the kernels the scheme prints: forward, backward,
    backward_params, from the program codegen.tensor_lower.lowered(op) lowers (rewritten alike, with the param's
    factor a step: LayerNorm's x hat, which steps_read_back finds in the backward). The fused forward saves no
    factor (the loops compute it again for nothing, where saving it is a pass more), so the backward's loops
    compute each one they read again from its definition: the same values the NumPy backward reads, where
    reading x - mu instead formed (eps + var)^(3/2), which overflows first."""
    program = rewritten(program_of(factor_saved(op)), names_of(op))
    again = recomputed(op, program)
    params = [a.name for a in program.backward if a.name in {f"d{p}" for p in op.params}]
    backward = (*again, *program.backward)
    return program.forward, {"forward": program.forward, "backward": needed(backward, program.returns),
                             "backward_params": needed(backward, params)}


def recomputed(op, program):
    """The forward steps the backward program reads that op declares not (factor_saved's): the fused forward
    does not return them."""
    declared = {s.name for s in op.steps}
    read = set().union(*(reads_of(a.expr) for a in program.backward))
    return tuple(s for s in program.forward if s.name in read and s.name not in declared)


def needed(assignments, names):
    """The assignments that computing names reads, in order."""
    wanted, kept = set(names), []
    for a in reversed(assignments):
        if a.name in wanted:
            kept.insert(0, a)
            wanted |= reads_of(a.expr)
    return tuple(kept)


class Kernel:
    """One function's assignments as the lines of a jitted function over (r, I), taking args and returning
    returns (the NumPy function's); steps: the forward steps, whose axes a backward's saved arguments have."""

    def __init__(self, op, scheme, name, assignments, args, returns, steps):
        self.op, (self.r, self.inner), self.name, self.args, self.returns = op, scheme, name, list(args), list(returns)
        self.axes = {**op.inputs, **{p: a for p, (a, _) in op.params.items()}, "g": op.steps[-1].indices,
                     **{a.name: a.indices for a in (*steps, *assignments)}}
        self.full = set(self.inner) | {self.r}
        self.indices = {str(i): i for i in self.full}
        self.taken = names_of(op) | set(self.axes) | set(OWN_NAMES)
        self.run = self.merged_run(op.steps[-1].indices)
        self.merged = sp.Symbol(self.fresh("".join(map(str, self.run)))) if self.run else None
        self.level, self.rows, self.used = {}, [], set()
        self.reductions, self.writes, self.partials, self.totals, self.stores = [], [], [], [], []
        self.maxima = set()  # the accumulators of a Maximum over I (the others a Sum's)
        self.local = {name: self.fresh(f"{name}_{self.r}") for name, axes in self.axes.items() if axes == (self.r,)}
        self.defined = {}  # {full assignment: its value}, substituted where a later one reads it
        for name in args:
            if self.axes.get(name) == (self.r,):
                self.row(sp.Symbol(self.local[name]), sp.IndexedBase(name)[self.r], loaded=True)
        for a in assignments:
            self.assign(a)

    def merged_run(self, order):
        """The inner indices after the row's, the arrays' last axes, where they are two or more and every array
        over any of them has them all, in that order, last: one loop over them all. A row's run of entries is
        then one contiguous stretch (BatchNorm2d's h, w: 784, where a loop over w alone, 28 long, is too short
        for the vectorized loop numba prints, and ran 4x slower); ()."""
        run = order[order.index(self.r) + 1:]
        if len(run) < 2 or any(set(axes) & set(run) and tuple(axes[-len(run):]) != run for axes in self.axes.values()):
            return ()
        return run

    def looped(self, indices):
        """indices as the loops index an array: the merged run one index."""
        if not self.run or tuple(indices[-len(self.run):]) != self.run:
            return tuple(indices)
        return (*indices[:-len(self.run)], self.merged)

    def extent(self, index):
        """The size of a loop's index: the product of the merged run's."""
        return "*".join(str(size_of(i)) for i in self.run) if index == self.merged else str(size_of(index))

    def viewed(self, name, axes):
        """The argument name as the kernel takes it: reshaped, the merged run one axis (a view of a contiguous
        array, as the outputs are; a copy of another)."""
        if self.looped(axes) == tuple(axes):
            return name
        return f"{name}.reshape(({', '.join(self.extent(i) for i in self.looped(axes))}))"

    def fresh(self, name):
        name = fresh(name, self.taken)
        self.taken.add(name)
        return name

    def kind(self, indices):
        """What an array over indices is to the loops: "full", "row" or "over rows" (a param's shape)."""
        if set(indices) == self.full and len(indices) == len(self.full):
            return "full"
        if tuple(indices) == (self.r,):
            return "row"
        if indices and set(indices) <= set(self.inner):
            return "over rows"
        raise FusionError(f"an array over {', '.join(map(str, indices)) or 'no index'} (rows are over {self.r})")

    def level_of(self, expr):
        return max((self.level[s] for s in expr.free_symbols if s in self.level), default=0)

    def row(self, symbol, expr, loaded=False):
        """A per-row local: computed (or loaded) once a row, as soon as what it reads is known."""
        self.level[symbol] = 0 if loaded else self.level_of(expr)
        self.rows.append((symbol, expr, loaded))
        return symbol

    def prepared(self, expr):
        """expr with each Sum's index renamed to the loop's (k' to k), full steps substituted, row arrays read as
        their row locals; FusionError for a read the loops cannot index."""
        def renamed(total):
            mapping = {}
            for v, low, high in total.limits:
                index = self.indices.get(str(v).rstrip("'"))
                if index is None or low != 0 or sp.simplify(high - (size_of(index) - 1)) != 0:
                    raise FusionError(f"a sum over {v} from {low} to {high}")
                mapping[v] = index
            if set(mapping.values()) & total.function.free_symbols - set(mapping):
                raise FusionError("a sum whose index is also free in its summand")
            return Sum(total.function.xreplace(mapping), *((i, 0, size_of(i) - 1) for i in mapping.values()))
        expr = expr.replace(lambda e: isinstance(e, Sum), renamed)
        for read in sorted(expr.atoms(sp.Indexed), key=sp.default_sort_key):
            name = read.base.name
            if name not in self.axes or any(str(i) != str(a) for i, a in zip(read.indices, self.axes[name])) \
                    or len(read.indices) != len(self.axes[name]):
                raise FusionError(f"it reads {read} (a shifted, gathered or transposed read)")
        expr = expr.xreplace({e: self.defined[e.base.name] for e in expr.atoms(sp.Indexed)
                              if e.base.name in self.defined})
        return expr.xreplace({e: sp.Symbol(self.local[e.base.name]) for e in expr.atoms(sp.Indexed)
                              if self.axes[e.base.name] == (self.r,)})

    def is_row(self, expr):
        """Whether expr is one value per row: it reads no array over I and no index."""
        return not expr.atoms(sp.Indexed) and not expr.free_symbols & self.full

    def hoisted(self, expr):
        """expr with each per-row subexpression of more than a symbol or a number a row local."""
        if self.is_row(expr):
            return expr if expr.is_Atom or (expr.is_Mul and expr.could_extract_minus_sign() and (-expr).is_Atom) \
                else self.temporary(expr)
        if isinstance(expr, sp.Indexed) or not expr.args:
            return expr
        if expr.is_Add or expr.is_Mul:
            per_row = [a for a in expr.args if self.is_row(a)]
            rest = [self.hoisted(a) for a in expr.args if not self.is_row(a)]
            return expr.func(*([self.hoisted(expr.func(*per_row))] if per_row else []), *rest)
        return expr.func(*(self.hoisted(a) for a in expr.args))

    def temporary(self, expr):
        """The row local holding expr, made if no local holds it yet."""
        known = next((s for s, e, loaded in self.rows if not loaded and e == expr), None)
        return known or self.row(sp.Symbol(self.fresh(f"r{len(self.rows)}")), expr)

    def row_sums(self, expr):
        """expr with each sum (or Maximum, of a value that is never below 0) over I an accumulator of the loop
        of its level."""
        def accumulated(total):
            if total.function.has(Sum) or {v for v, _, _ in total.limits} != set(self.inner):
                summed = ", ".join(str(v) for v, _, _ in total.limits)
                raise FusionError(f"a sum over {summed} (rows are over {self.r})")
            summand = self.hoisted(total.function)
            largest = isinstance(total, Maximum)
            known = next((a for a, e in self.reductions if e == summand and (a in self.maxima) == largest), None)
            if known is not None:  # two steps reducing one summand
                return known
            accumulator = sp.Symbol(self.fresh(f"a{len(self.reductions)}"))
            self.level[accumulator] = self.level_of(summand) + 1
            self.reductions.append((accumulator, summand))
            self.maxima |= {accumulator} if largest else set()
            return accumulator
        return expr.replace(lambda e: isinstance(e, (Sum, Maximum)) and {v for v, _, _ in e.limits} != {self.r},
                            accumulated)

    def assign(self, a):
        """Take assignment a into the loops: a row local, a full output (or a value later ones read), a param's."""
        kind, expr = self.kind(a.indices), self.prepared(a.expr)
        if kind == "over rows":
            return self.over_rows(a, expr)
        expr = self.row_sums(expr)
        if expr.has(Sum):
            raise FusionError(f"{a.name} sums over rows inside a row's value")
        if kind == "row":
            symbol = self.row(sp.Symbol(self.local[a.name]), expr)
            if a.name in self.returns:
                self.stores.append((a.name, symbol))
        else:  # a later step reads it as its value, computed again where it is read
            self.defined[a.name] = expr
            if a.name in self.returns:
                value = self.hoisted(expr)
                self.writes.append((a, value, self.level_of(value) + 1))

    def over_rows(self, a, expr):
        """A param's gradient: each sum over rows a partial sum per chunk, added once the rows are done."""
        def partial(total):
            if total.function.has(Sum) or [v for v, _, _ in total.limits] != [self.r]:
                raise FusionError(f"{a.name}: a sum over rows that also sums over {', '.join(map(str, total.limits))}")
            summand = self.row_sums(total.function)
            summand = self.hoisted(summand)
            parts, total_name = self.fresh(f"{a.name}_parts"), self.fresh(f"b{len(self.partials)}")
            self.partials.append((parts, a.indices, summand, self.level_of(summand) + 1, total_name))
            return sp.Symbol(total_name)
        value = expr.replace(lambda e: isinstance(e, Sum) and [v for v, _, _ in e.limits] == [self.r], partial)
        if value.has(Sum) or value.free_symbols & set(self.level):
            raise FusionError(f"{a.name} reads a row's value outside its sums over rows")
        self.totals.append((a, value))

    # printing

    def code(self, expr):
        """expr as numba code: arrays at the loops' indices, sizes and options in T."""
        names = {e: sp.Symbol(f"{e.base.name}[{', '.join(map(str, self.looped(e.indices)))}]")
                 for e in expr.atoms(sp.Indexed)}
        names |= {s: sp.Symbol(f"T({s})") for s in expr.free_symbols
                  if isinstance(s, sp.Symbol) and s.name in self.op.options or s in self.sizes_read(expr)}
        return FusedPrinter(self.used).doprint(expr.xreplace(names))

    @staticmethod
    def sizes_read(expr):
        """The sizes (K, N) expr reads: integers, named by a capital."""
        return {s for s in expr.free_symbols if isinstance(s, sp.Symbol) and s.is_integer and s.name[:1].isupper()}

    def lines(self):
        """(the plain function's lines, the jitted kernel's arguments and lines): the plain function allocates
        the outputs and the partial sums with NumPy, which asks for huge pages (numba's np.empty faults in
        every 4 KiB page of a new array: a (8192, 1024) float32 output took 35 ms where a copy takes 7), and
        calls the kernel."""
        first = next((a for a in self.args if self.kind_of_array(a) == "full"), self.args[0])
        parts = [parts for parts, *_ in self.partials]
        plain = self.size_lines(self.args, self.axes) + self.allocations(first)
        if self.partials:
            # one chunk at least where there are no rows: the totals read the first chunk's partial sums (zeros)
            plain += [f"chunks = max(min({size_of(self.r)}, {CHUNKS}), 1)"]
            # kept across calls and zeroed by each chunk's thread: new arrays of zeros (LayerNorm's two (64, 1024)
            # float32) took 10-60 us on the calling thread, 350 us where their pages were fresh
            plain += [f'{parts} = kept_empty("{self.op.module}.{self.name}.{parts}", (chunks, '
                      f'{", ".join(str(size_of(i)) for i in axes)}), {first}.dtype)'
                      for parts, axes, *_ in self.partials]
            self.used |= {"kept_empty"}
        arguments = self.args + self.returns + parts + [str(size_of(i)) for i in self.run]
        axes = {**self.axes, **{parts: (None, *axes) for parts, axes, *_ in self.partials}}
        call = [self.viewed(a, axes[a]) if a in axes else a for a in arguments]
        return plain + [f"_{self.name}({', '.join(call)})"], arguments, self.kernel_lines(first)

    def kernel_lines(self, first):
        """The jitted kernel's body: per row (per chunk of rows where it sums over them), the row locals of each
        level and the loop after them; then the params' gradients from their partial sums."""
        loops = max([level for _, _, level in self.writes] + [level for *_, level, _ in self.partials]
                    + [self.level[a] for a, _ in self.reductions] + [0])
        viewed = {a: self.looped(axes) for a, axes in self.axes.items()}
        lines = [f"T = {first}.dtype.type"] + self.size_lines(self.args, viewed, given={size_of(i) for i in self.run})
        if self.partials:
            # each chunk's partial sums zeroed by its own thread (kept across calls, they hold the last call's)
            zeroed = self.per_shape(lambda parts, at: f"{parts}[chunk, {at}] = T(0)")
            lines += [f"chunks = {self.partials[0][0]}.shape[0]", "for chunk in numba.prange(chunks):"]
            lines += ["    " + line for line in zeroed]
            lines += [f"    for {self.r} in range(chunk * {size_of(self.r)} // chunks, (chunk + 1) * "
                      f"{size_of(self.r)} // chunks):"]
            depth = 2
        else:
            lines += [f"for {self.r} in numba.prange({size_of(self.r)}):"]
            depth = 1
        body = []
        for level in range(loops + 1):
            body += self.row_lines(level)
            if level < loops:
                body += self.loop(level + 1)
        lines += ["    " * depth + line for line in body]
        return lines + self.total_lines()

    def kind_of_array(self, name):
        """kind of an argument's axes; None for an option or an array outside the scheme."""
        try:
            return self.kind(self.axes[name]) if name in self.axes else None
        except FusionError:
            return None

    def size_lines(self, args, axes, given=()):
        """Each size the kernel reads but the given ones, from the first of args (over axes) with that axis."""
        wanted = {size_of(i) for i in self.full}
        for _, expr, _ in self.rows:
            wanted |= self.sizes_read(expr)
        for exprs in ([e for _, e in self.reductions], [e for _, e, _ in self.writes], [p[2] for p in self.partials],
                      [e for _, e in self.totals]):
            for e in exprs:
                wanted |= self.sizes_read(e)
        lines = []
        for size in sorted(wanted - set(given), key=str):
            found = next(((a, n) for a in args for n, i in enumerate(axes.get(a, ())) if size_of(i) == size), None)
            if found is None:
                raise FusionError(f"size {size} is read by no argument's shape")
            lines.append(f"{size} = {found[0]}.shape[{found[1]}]")
        return lines

    def allocations(self, first):
        """The outputs, empty, in the first full argument's dtype; a full one an array an earlier call returned
        where nothing holds it any more (_runtime.kept_empty: a new one of LayerNorm's size is a fresh mmap)."""
        def shape(axes):
            return f"({', '.join(str(size_of(i)) for i in axes)}{',' if len(axes) == 1 else ''})"
        full = [a for a, _, _ in self.writes if self.kind(a.indices) == "full"]
        self.used |= {"kept_empty"} if full else set()
        return ([f'{a.name} = kept_empty("{self.op.module}.{self.name}.{a.name}", {shape(a.indices)}, {first}.dtype)'
                 for a in full]
                + [f"{a.name} = np.empty({shape(a.indices)}, {first}.dtype)"
                   for a in [a for a, _, _ in self.writes if a not in full] + [a for a, _ in self.totals]]
                + [f"{name} = np.empty({size_of(self.r)}, {first}.dtype)" for name, _ in self.stores])

    def row_lines(self, level):
        """The row locals of a level, computed or loaded, and those of them the kernel returns stored."""
        lines = []
        for symbol, expr, loaded in self.rows:
            if self.level[symbol] == level:
                lines.append(f"{symbol} = {self.code(expr) if not loaded else f'{expr.base.name}[{self.r}]'}")
        return lines + [f"{name}[{self.r}] = {symbol}" for name, symbol in self.stores if self.level[symbol] == level]

    def nest(self, indices, body):
        """body inside one loop per index, in order."""
        lines = []
        for depth, i in enumerate(indices):
            lines.append("    " * depth + f"for {i} in range({self.extent(i)}):")
        return lines + ["    " * len(indices) + line for line in body]

    def loop(self, level):
        """One pass over the row: the reductions of this level, the outputs and partial sums written in it."""
        here = [(a, e) for a, e in self.reductions if self.level[a] == level]
        body = [f"{a} = maximum({a}, {self.code(e)})" if a in self.maxima else f"{a} = {a} + {self.code(e)}"
                for a, e in here]
        self.used |= {"maximum"} if self.maxima & {a for a, _ in here} else set()
        body += [f"{a.name}[{', '.join(map(str, self.looped(a.indices)))}] = {self.code(e)}"
                 for a, e, at in self.writes if at == level]
        body += [f"{parts}[chunk, {', '.join(map(str, self.looped(axes)))}] += {self.code(e)}"
                 for parts, axes, e, at, _ in self.partials if at == level]
        return [f"{a} = T(0)" for a, _ in here] + self.nest(self.looped(self.inner), body)

    def per_shape(self, line):
        """One loop nest per shape of the partial sums (a chunk's), holding line(name, its indices) of each of
        that shape."""
        lines = []
        for axes in dict.fromkeys(self.looped(axes) for _, axes, *_ in self.partials):
            at = ", ".join(map(str, axes))
            lines += self.nest(axes, [line(parts, at) for parts, own, *_ in self.partials if self.looped(own) == axes])
        return lines

    def total_lines(self):
        """Each param's gradient from the chunks' partial sums: every chunk's added into the first chunk's, a row
        of partial sums at a time, then the gradient read from the first's. Each entry is summed in chunk order,
        as a loop over the chunks per entry sums it, but along contiguous rows: that loop strides a row of
        partial sums per step (4 KiB for LayerNorm's (64, 1024) float32, every step in one set of the cache),
        0.35 ms a call, on one thread after the rows' parallel loop."""
        added = self.per_shape(lambda parts, at: f"{parts}[0, {at}] += {parts}[chunk, {at}]")
        lines = ["for chunk in range(1, chunks):"] + ["    " + line for line in added] if added else []
        for a, value in self.totals:
            at = ", ".join(map(str, self.looped(a.indices)))
            body = [f"{total} = {parts}[0, {at}]" for parts, _, _, _, total in self.partials
                    if total in map(str, value.free_symbols)]
            body.append(f"{a.name}[{at}] = {self.code(value)}")
            lines += self.nest(self.looped(a.indices), body)
        return lines


def fused_function(op, scheme, function, assignments, steps):
    """function (a context entry of codegen.tensor_lower.module_context) with its jitted body, or FusionError."""
    kernel = Kernel(op, scheme, function["name"], assignments, function["args"], function["returns"], steps)
    lines, arguments, jitted = kernel.lines()
    # the assignments the loops print (rewritten, the factor computed again), not the NumPy kernel's derivation
    return dict(function, lines=lines, kernel_args=arguments, jitted=jitted, runtime=sorted(kernel.used),
                derivation=[str(a) for a in assignments])


def fast_context(op):
    """What templates/tensor_fused.py.jinja needs: module_context's context of op, saving no param's factor (the
    loops compute it again for nothing), with every function the scheme prints fused (the others the NumPy
    ones, imported with the reason they are not fused); FusionError where none is."""
    op = with_flags(op, {})
    scheme = row_scheme(op)
    steps, assignments = programs(op)
    context = with_largest(module_context(op, factor=False), assignments)
    functions, errors = [], []
    for function in context["functions"]:
        try:
            if function["name"] not in assignments:
                raise FusionError("no fused form of this kernel (the scheme prints forward and backward)")
            functions.append(fused_function(op, scheme, function, assignments[function["name"]], steps))
        except FusionError as error:
            functions.append(dict(function, jitted=None, error=str(error)))
            errors.append(f"{function['name']}: {error}")
    if all(f["jitted"] is None for f in functions):
        raise FusionError("; ".join(errors))
    return dict(context, functions=functions, imports=[], package="..", error_model=ERROR_MODEL,
                fallback=any(f["jitted"] is None for f in functions),
                fused_runtime=sorted({name for f in functions for name in f.get("runtime", ())}))


def with_largest(context, assignments):
    """context with forward returning the largest factor^2 of each row where the class checks it (codegen.
    tensor_lower.isolated_context's step: the NumPy kernels' check reads the factor they save, which the fused
    ones do not), a Maximum the loop writing y reduces, and inf at the rows forward computes again in units
    (their statistics overflowed, and so did the loops' factor): those are checked too, the exact form holding
    at any entry. assignments: given that step."""
    units = context["units"]
    step = ((units or {}).get("isolated") or {}).get("step")
    if step is None:
        return context
    assignments["forward"] = (*assignments["forward"], step)
    functions = [dict(f, returns=(*f["returns"], step.name), derivation=(*f["derivation"], str(step)))
                 if f["name"] == "forward" else f for f in context["functions"]]
    flagged = f"{step.name}[rows] = np.inf  # checked in backward: the factor overflowed in the loops"
    return dict(context, functions=functions, forward_returns=[*context["forward_returns"], step.name],
                units=dict(units, written=[*units["written"], flagged]))


def fusion_error(op):
    """Why op has no fused module (the codegen summary's line), or None where its forward or backward fuses."""
    op = with_flags(op, {})
    errors = []
    try:
        scheme = row_scheme(op)
        steps, assignments = programs(op)
    except FusionError as error:
        return str(error)
    arrays = [*op.inputs, *op.params, *(s.name for s in steps), "g", *op.options]
    for name in ("forward", "backward"):
        try:
            Kernel(op, scheme, name, assignments[name], arrays, [a.name for a in assignments[name]], steps).lines()
            return None
        except FusionError as error:
            errors.append(f"{name}: {error}")
    return "; ".join(errors)


def agreement(op, reference, cls, rng):
    """[(variant, GradientCheck)]: the output and every gradient of cls (op's fused class) against those of
    reference (its NumPy class) at the same sampled inputs and params, with every param's gradient alone too
    (backward(g, input_grad=False)). A wrong value its own gradient is consistent with passes the finite
    differences, and not this."""
    constructor, arrays, params = sample(op, rng)
    upstream = None

    def run(c, input_grad=True):
        nonlocal upstream
        instance = c(**constructor)
        for p, value in params.items():
            setattr(instance, p, value.copy())
        y = instance.forward(*(arrays[a] for a in op.inputs))
        upstream = rng.standard_normal(np.shape(y)) if upstream is None else upstream
        grads = instance.backward(upstream, **({} if input_grad else {"input_grad": False}))
        grads = grads if isinstance(grads, tuple) else (grads,) * bool(input_grad)
        return [("forward", y), *zip(op.inputs, grads), *((f"d{p}", getattr(instance, f"d{p}")) for p in params)]
    checks = []
    for alone in (False, True) if getattr(reference, "params_alone", False) else (False,):
        mine, theirs = run(cls, not alone), run(reference, not alone)
        checks += [(f"{name}{' (params alone)' if alone else ''}",
                    GradientCheck(np.asarray(a, np.float64), np.asarray(b, np.float64), AGREEMENT))
                   for (name, a), (_, b) in zip(mine, theirs)]
    return checks
