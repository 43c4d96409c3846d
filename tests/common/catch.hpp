// The one place that names the test framework (Catch2 v2.13 from Debian's
// catch2 package). Moving to Catch2 v3 is an edit of this file alone.
#pragma once
#include <catch2/catch.hpp>
