// Host driver of csrc/numerics.h, the numeric rules that the CPU and CUDA kernels share: reads one
// query a line from stdin and prints the rule's answer, so that tests/test_numerics.py compares
// every rule with fusedclip/numerics.py (and torch) bit for bit. Built with g++ alone: no torch,
// no CUDA. Floats travel as C99 hex literals (%a), exactly.
//
//   kind P                      -> the NormKind of p (its integer value)
//   coef32 TOTAL MAX_NORM       -> clip_coefficient<float>
//   coef64 TOTAL MAX_NORM       -> clip_coefficient<double>
//   root32 KIND STATISTIC P E   -> root_of_statistic<KIND, float> (E: 1 when there are no elements)
//   root64 KIND STATISTIC P E   -> root_of_statistic<KIND, double>
//   rescaled PIVOT SCALED P     -> rescaled_norm
//   again NORM P                -> norm_out_of_range (0 or 1)
//   pivot P                     -> pivot_norm_type
#include <cstdio>
#include <cstdlib>
#include <cstring>

#include "numerics.h"

namespace {

using fusedclip::NormKind;

template <typename A>
A root(int kind, A statistic, double p, bool empty) {
  switch (static_cast<NormKind>(kind)) {
    case NormKind::kSquareSum: return fusedclip::root_of_statistic<NormKind::kSquareSum>(statistic, p, empty);
    case NormKind::kAbsSum: return fusedclip::root_of_statistic<NormKind::kAbsSum>(statistic, p, empty);
    case NormKind::kPowerSum: return fusedclip::root_of_statistic<NormKind::kPowerSum>(statistic, p, empty);
    case NormKind::kMax: return fusedclip::root_of_statistic<NormKind::kMax>(statistic, p, empty);
    case NormKind::kMin: return fusedclip::root_of_statistic<NormKind::kMin>(statistic, p, empty);
    case NormKind::kCount: return fusedclip::root_of_statistic<NormKind::kCount>(statistic, p, empty);
  }
  std::fprintf(stderr, "unknown kind %d\n", kind);
  std::exit(2);
}

}  // namespace

int main() {
  char op[16];
  while (std::scanf("%15s", op) == 1) {
    double a, b, c;
    int kind, empty;
    if (!std::strcmp(op, "kind") && std::scanf("%la", &a) == 1) {
      std::printf("%d\n", static_cast<int>(fusedclip::norm_kind(a)));
    } else if (!std::strcmp(op, "coef32") && std::scanf("%la %la", &a, &b) == 2) {
      std::printf("%a\n", static_cast<double>(fusedclip::clip_coefficient(static_cast<float>(a), b)));
    } else if (!std::strcmp(op, "coef64") && std::scanf("%la %la", &a, &b) == 2) {
      std::printf("%a\n", fusedclip::clip_coefficient(a, b));
    } else if (!std::strcmp(op, "root32") && std::scanf("%d %la %la %d", &kind, &a, &b, &empty) == 4) {
      std::printf("%a\n", static_cast<double>(root<float>(kind, static_cast<float>(a), b, empty != 0)));
    } else if (!std::strcmp(op, "root64") && std::scanf("%d %la %la %d", &kind, &a, &b, &empty) == 4) {
      std::printf("%a\n", root<double>(kind, a, b, empty != 0));
    } else if (!std::strcmp(op, "rescaled") && std::scanf("%la %la %la", &a, &b, &c) == 3) {
      std::printf("%a\n", fusedclip::rescaled_norm(a, b, c));
    } else if (!std::strcmp(op, "again") && std::scanf("%la %la", &a, &b) == 2) {
      std::printf("%d\n", fusedclip::norm_out_of_range(a, b) ? 1 : 0);
    } else if (!std::strcmp(op, "pivot") && std::scanf("%la", &a) == 1) {
      std::printf("%a\n", fusedclip::pivot_norm_type(a));
    } else {
      std::fprintf(stderr, "bad query: %s\n", op);
      return 2;
    }
  }
  return 0;
}
