# Under Triton 3.9: does compiling a product kernel as the model launches it ("pinned") warn
# about TRITON_DEFAULT_FP_FUSION, and does it without models.triton_launch's options
# ("unpinned")? Run from the repository root: python docs/results/session22/fp_fusion_warning.py pinned
import sys, warnings
sys.path.insert(0, "."); sys.path.insert(0, "tests")
import benchmarks.sm90 as sm90
from models import products_triton as k
from test_triton_compile import compile_product
if sys.argv[1] == "unpinned":
    sm90.COMPILE_OPTIONS = {}
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    compile_product("fwd", 64, 256, k.launch_config("fwd", 64, 256))
print(sys.argv[1], [str(w.message)[:60] for w in caught if "FP_FUSION" in str(w.message)])
