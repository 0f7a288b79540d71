// Entry point of the C++ unit tests: runs every registered case (or those matching argv[1]).
#include "harness.hpp"

int main(int argc, char** argv) {
  return harness::run_all(argc, argv);
}
