"""The one printer: SymPy's NumPyPrinter with the array operations of codegen.lower added."""
from sympy.printing.numpy import NumPyPrinter
from sympy.printing.precedence import precedence


class KernelPrinter(NumPyPrinter):
    """Prints as np.<name> and knows the row/batch reductions."""

    def __init__(self):
        super().__init__({"fully_qualified_modules": True, "allow_unknown_functions": False})

    def _module_format(self, fqn, register=True):
        return "np." + fqn[len("numpy."):] if fqn.startswith("numpy.") else super()._module_format(fqn, register)

    def _print_Pow(self, expr, rational=False):
        # integer powers print as a reader writes them: 1/N, y**2 (a Python int keeps the dtype)
        base = self.parenthesize(expr.base, precedence(expr), strict=False)
        if expr.exp == -1:
            return f"1/{base}"
        if expr.exp.is_Integer and expr.exp > 0:
            return f"{base}**{expr.exp}"
        return super()._print_Pow(expr, rational)

    def _print_RowSum(self, expr):
        return f"np.sum({self._print(expr.args[0])}, axis=-1, keepdims=True)"

    def _print_RowMax(self, expr):
        return f"np.max({self._print(expr.args[0])}, axis=-1, keepdims=True)"

    def _print_AtLabel(self, expr):
        return f"{self._print(expr.args[0])}[rows, c]"

    def _print_BatchSum(self, expr):
        return f"np.sum({self._print(expr.args[0])})"

    def _print_Column(self, expr):
        return f"{self._print(expr.args[0])}[:, None]"

    def _print_Squeeze(self, expr):
        return f"np.squeeze({self._print(expr.args[0])}, axis=-1)"


def print_code(expr):
    """expr as NumPy source."""
    return KernelPrinter().doprint(expr)
