# Finds the Debian-packaged dependencies and builds llhttp from the C sources
# that Debian's node-llhttp package installs. No third-party code lives in
# this repository.
find_package(PkgConfig REQUIRED)
set(THREADS_PREFER_PTHREAD_FLAG ON)
find_package(Threads REQUIRED)
pkg_check_modules(LIBUV REQUIRED IMPORTED_TARGET libuv>=1.44)
pkg_check_modules(HIREDIS REQUIRED IMPORTED_TARGET hiredis>=0.14)
pkg_check_modules(JEMALLOC REQUIRED IMPORTED_TARGET jemalloc)
pkg_check_modules(YAML REQUIRED IMPORTED_TARGET yaml-0.1)
pkg_check_modules(CMOCKA QUIET IMPORTED_TARGET cmocka)
# The tests need packages that a release build does not (libcmocka-dev,
# python3; deps/install.sh's `tests` list): they are built when those are
# there, and a build stage with only `deps/install.sh build` still makes the
# binaries. The default is taken at the first configure of a tree.
if(CMOCKA_FOUND)
  set(SLUICE_TESTS_DEFAULT ON)
else()
  set(SLUICE_TESTS_DEFAULT OFF)
endif()
option(SLUICE_TESTS "build and register the tests (needs libcmocka-dev and python3)" ${SLUICE_TESTS_DEFAULT})
if(SLUICE_TESTS AND NOT CMOCKA_FOUND)
  message(FATAL_ERROR "SLUICE_TESTS is ON but cmocka was not found: install libcmocka-dev "
                      "(deps/install.sh) or configure with -DSLUICE_TESTS=OFF")
endif()
if(NOT SLUICE_TESTS)
  message(STATUS "sluice: tests OFF (cmocka not found or -DSLUICE_TESTS=OFF): building the binaries only; "
                 "install the test packages (deps/install.sh) and configure with -DSLUICE_TESTS=ON to build them")
endif()

set(LLHTTP_SRC_DIR /usr/share/llhttp CACHE PATH "llhttp C sources (node-llhttp)")
set(LLHTTP_INC_DIR /usr/share/include/llhttp CACHE PATH "llhttp header (node-llhttp)")
foreach(f api.c http.c llhttp.c)
  if(NOT EXISTS ${LLHTTP_SRC_DIR}/${f})
    message(FATAL_ERROR "llhttp source ${LLHTTP_SRC_DIR}/${f} not found: install node-llhttp (deps/install.sh)")
  endif()
endforeach()
add_library(llhttp STATIC ${LLHTTP_SRC_DIR}/api.c ${LLHTTP_SRC_DIR}/http.c ${LLHTTP_SRC_DIR}/llhttp.c)
target_include_directories(llhttp SYSTEM PUBLIC ${LLHTTP_INC_DIR})
# Generated third-party code: our warning flags are not its contract.
target_compile_options(llhttp PRIVATE -w -O2)

# jemalloc is every binary's allocator, except under sanitizers, whose own
# allocator must see every allocation.
add_library(sl_alloc INTERFACE)
if(NOT SLUICE_SANITIZE)
  target_link_libraries(sl_alloc INTERFACE PkgConfig::JEMALLOC)
endif()
