# hookd as a Nix package: `pkgs.callPackage ./package.nix { }`.
{ lib, python3Packages }:

python3Packages.buildPythonApplication {
  pname = "hookd";
  version = "0.1.0";
  pyproject = true;
  src = lib.cleanSource ../.;

  build-system = [ python3Packages.setuptools ];
  dependencies = with python3Packages; [
    aiohttp
    aiobotocore
    pynacl
    pyzstd
    aiosqlite
    click
    sdnotify
    prometheus-client
    uvloop
  ];

  # The test suite starts its own nix-daemon, S3 server and nginx: it runs in CI, not in the sandbox.
  doCheck = false;
  pythonImportsCheck = [ "hookd" "hookd.hook" ];

  meta = {
    description = "Upload every path a Nix builder realises to a signed binary cache, without slowing builds down";
    license = lib.licenses.mit;
    mainProgram = "hookd";
    platforms = lib.platforms.linux;
  };
}
