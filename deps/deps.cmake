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
pkg_check_modules(CMOCKA IMPORTED_TARGET cmocka)

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
