// Boost.JSON compiled from source into the fuzz target, so that the fuzzer's coverage
// instrumentation reaches the JSON parser too (the packaged library is not instrumented).
#include "boost/json/src.hpp"
