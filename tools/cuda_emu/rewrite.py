"""Turns a CUDA source into C++ that include/emu.h can run: python rewrite.py SRC.cu OUT.cpp

Three textual changes; line numbers are kept and #line points compiler errors at SRC.cu:
  kernel<<<grid, block, smem, stream>>>(args)
      -> emu::launch(emu::cfg(grid, block, smem, stream), [&] { kernel(args); })
  extern __shared__ T name[];  ->  T* name = emu::dynamic_smem<T>();
  CUDA_KERNEL_ASSERT*          ->  EMU_KERNEL_ASSERT*  (torch's would abort the process)
"""
import re
import sys


def closing(text, i, open_, close):
    """Index just past the bracket that closes the one at text[i]."""
    depth = 0
    for j in range(i, len(text)):
        depth += (text[j] == open_) - (text[j] == close)
        if depth == 0:
            return j + 1
    sys.exit(f"rewrite.py: unbalanced {open_} at offset {i}")


def name_start(text, end):
    """Start of the kernel name, template arguments included, that ends at text[end]."""
    i, depth = end, 0
    while i > 0:
        c = text[i - 1]
        if depth == 0 and not (c.isalnum() or c in "_:>"):
            break
        depth += (c == ">") - (c == "<")
        i -= 1
    return i


def rewrite_launches(text):
    out, pos = [], 0
    while (chevrons := text.find("<<<", pos)) >= 0:
        start = name_start(text, chevrons)
        config_end = text.index(">>>", chevrons)
        args = config_end + 3 + (len(text[config_end + 3:]) - len(text[config_end + 3:].lstrip()))
        if start == chevrons or text[args] != "(":
            sys.exit(f"rewrite.py: cannot parse the launch at offset {chevrons}")
        args_end = closing(text, args, "(", ")")
        out += [text[pos:start], f"emu::launch(emu::cfg({text[chevrons + 3:config_end]}), [&] {{ ",
                text[start:chevrons], text[args:args_end], "; })"]
        pos = args_end
    return "".join(out) + text[pos:]


src, dst = sys.argv[1:]
text = open(src).read()
text = rewrite_launches(text)
text = re.sub(r"extern __shared__ (\w+) (\w+)\[\];", r"\1* \2 = emu::dynamic_smem<\1>();", text)
text = re.sub(r"\bCUDA_KERNEL_ASSERT", "EMU_KERNEL_ASSERT", text)
if "extern __shared__" in text:
    sys.exit(f"rewrite.py: {src}: an extern __shared__ declaration of another form")
open(dst, "w").write(f'#line 1 "{src}"\n' + text)
