"""What can be checked of docker/ without a Docker engine: the image builds
with the same deps/ script and CMake commands as the tests, its runtime
stage installs every shared library the binaries load, its configuration
passes `sluice -t`, and the compose file wires the services by name."""

import os
import re
import shutil
import subprocess
import tempfile
import unittest

import harness

SRC = os.environ.get("SLUICE_SRC", os.path.join(os.path.dirname(__file__), "..", ".."))


def read(*parts):
    with open(os.path.join(SRC, *parts), encoding="utf-8") as f:
        return f.read()


def package_of(path):
    """The Debian package holding `path` (tries the /usr-merged name too)."""
    for p in (path, "/usr" + path if not path.startswith("/usr/") else path[4:]):
        r = subprocess.run(["dpkg", "-S", p], capture_output=True, text=True)
        if r.returncode == 0:
            return r.stdout.split(":")[0]
    return None


class Docker(unittest.TestCase):
    def test_build_stage_uses_the_projects_commands(self):
        df = read("docker", "Dockerfile")
        self.assertIn("FROM debian:bookworm-slim AS build", df)
        self.assertIn("bash deps/install.sh build", df)
        self.assertRegex(df, r"cmake -S \. -B build -DCMAKE_BUILD_TYPE=Release")
        self.assertRegex(df, r"--target sluice modstub sluice-rate")
        self.assertIn("USER sluice", df)
        self.assertRegex(df, r'ENTRYPOINT \["/usr/local/bin/sluice"')

    def test_release_build_needs_no_test_package(self):
        """The build stage installs only `deps/install.sh build`: CMake must
        configure without cmocka (the tests are then off, and it says so).
        cmocka is hidden from pkg-config here; the binaries' targets exist."""
        pcdir = tempfile.mkdtemp(prefix="sluice-pc-")
        self.addCleanup(shutil.rmtree, pcdir, True)
        path = subprocess.run(["pkg-config", "--variable", "pc_path", "pkg-config"], capture_output=True,
                              text=True, check=True).stdout.strip()
        for d in path.split(":"):
            if os.path.isdir(d):
                for name in os.listdir(d):
                    if name.endswith(".pc") and name != "cmocka.pc" and not os.path.exists(os.path.join(pcdir, name)):
                        os.symlink(os.path.join(d, name), os.path.join(pcdir, name))
        build = tempfile.mkdtemp(prefix="sluice-release-")
        self.addCleanup(shutil.rmtree, build, True)
        env = dict(os.environ, PKG_CONFIG_LIBDIR=pcdir)
        r = subprocess.run(["cmake", "-S", SRC, "-B", build, "-DCMAKE_BUILD_TYPE=Release"], env=env,
                           capture_output=True, text=True, timeout=120)
        self.assertEqual(r.returncode, 0, r.stdout[-2000:] + r.stderr[-2000:])
        self.assertIn("tests OFF", r.stdout)
        r = subprocess.run(["cmake", "--build", build, "--target", "help"], capture_output=True, text=True,
                           timeout=60)
        for target in ("sluice", "modstub", "sluice-rate"):
            self.assertRegex(r.stdout, rf"\.\.\. {re.escape(target)}\n")
        self.assertNotIn("test_meter", r.stdout)

    def test_runtime_stage_has_every_library(self):
        install = read("deps", "install.sh")
        runtime = re.search(r"^runtime=\(([^)]*)\)", install, re.M).group(1).split()
        for binary in ("sluice", "modstub", "sluice-rate"):
            out = subprocess.run(["ldd", harness.bin_path(binary)], capture_output=True, text=True,
                                 check=True).stdout
            for path in re.findall(r"=> (/\S+)", out):
                pkg = package_of(path)
                self.assertIsNotNone(pkg, path)
                pkg = pkg.split(",")[0].strip()
                base = pkg.split(":")[0]
                # libc, libgcc and libstdc++ come with every Debian image;
                # sanitizer runtimes only with test builds
                if base in ("libc6", "libgcc-s1", "libstdc++6") or re.match(r"lib(a|ub|t)san\d*$", base):
                    continue
                self.assertIn(base, runtime, f"{binary} loads {path} from {base}, "
                                             f"missing in deps/install.sh runtime")

    def test_image_configuration_checks(self):
        conf = read("docker", "sluice.yaml")
        # service names resolve only inside compose: check the rest here
        local = conf.replace("modstub:8000", "127.0.0.1:8000").replace("redis:6379", "127.0.0.1:6379")
        with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
            f.write(local)
        self.addCleanup(os.unlink, f.name)
        r = subprocess.run([harness.bin_path("sluice"), "-t", "-c", f.name], capture_output=True, text=True)
        self.assertEqual(r.returncode, 0, r.stderr)

    def test_compose_wiring(self):
        compose = read("docker", "compose.yaml")
        for service in ("redis:", "modstub:", "sluice:"):
            self.assertIn(f"\n  {service}", compose)
        self.assertIn("--appendonly", compose)
        self.assertIn("/healthz", compose)
        self.assertIn("./sluice.yaml:/etc/sluice/sluice.yaml:ro", compose)
        conf = read("docker", "sluice.yaml")
        self.assertIn("upstream: [modstub:8000]", conf)
        self.assertIn("redis: redis:6379", conf)


if __name__ == "__main__":
    unittest.main(verbosity=2)
