# services.hookd: every path this builder realises, in a signed binary cache.
#
#   imports = [ ./hookd/nixos-module ];
#   services.hookd = {
#     enable = true;
#     cache = "s3://my-bucket?region=eu-central-1";
#     secretKeyFile = "/var/lib/secrets/hookd-key";   # root:root 0400; see the README
#     environmentFile = "/var/lib/secrets/hookd-s3.env";
#     gc.enable = true;
#   };
{ config, lib, pkgs, ... }:

let
  cfg = config.services.hookd;
  inherit (lib) mkEnableOption mkIf mkOption types optional concatStringsSep;

  settingsFormat = pkgs.formats.toml { };
  configFile = settingsFormat.generate "hookd.toml" (
    {
      cache = cfg.cache;
      compression = cfg.compression;
      content_encoding = cfg.contentEncoding;
      listings = cfg.listings;
      realisations = cfg.realisations;
      upstream_caches = map (u: u.url) cfg.upstreamCaches;
      upstream_keys = map (u: u.key) cfg.upstreamCaches;
    }
    // lib.optionalAttrs (cfg.metricsListen != null) { metrics_listen = cfg.metricsListen; }
    // cfg.settings
  );

  # The post-build-hook nix-daemon runs after every build: Python started with -I -S, standard
  # library only, so the build loop waits milliseconds (see `hookd install-hook`).
  python = cfg.package.pythonModule or pkgs.python3;
  hookLauncher = pkgs.writeScript "hookd-hook" ''
    #!${python.interpreter} -IS
    import sys
    sys.path.insert(0, "${cfg.package}/${python.sitePackages}")
    from hookd.hook import main
    main()
  '';

  hardening = {
    UMask = "0027";
    NoNewPrivileges = true;
    CapabilityBoundingSet = "";
    AmbientCapabilities = "";
    ProtectSystem = "strict";
    ProtectHome = true;
    PrivateTmp = true;
    PrivateDevices = true;
    DevicePolicy = "closed";
    ProtectKernelTunables = true;
    ProtectKernelModules = true;
    ProtectKernelLogs = true;
    ProtectControlGroups = true;
    ProtectClock = true;
    ProtectHostname = true;
    ProtectProc = "invisible";
    ProcSubset = "pid";
    RestrictAddressFamilies = [ "AF_UNIX" "AF_INET" "AF_INET6" ];
    RestrictNamespaces = true;
    RestrictRealtime = true;
    RestrictSUIDSGID = true;
    LockPersonality = true;
    MemoryDenyWriteExecute = true;
    RemoveIPC = true;
    KeyringMode = "private";
    SystemCallArchitectures = "native";
    SystemCallFilter = [ "@system-service" "~@privileged @resources" ];
    SystemCallErrorNumber = "EPERM";
    Nice = 10;
    IOSchedulingClass = "idle";
    ReadWritePaths = cfg.readWritePaths;
  };

  serviceEnvironment = {
    HOOKD_STATE_DIR = "/var/lib/hookd";
    HOOKD_SOCKET = "/run/hookd/hookd.sock";
    HOOKD_SOCKET_GROUP = cfg.group;
    HOOKD_CONFIG = "${configFile}";
  };
in
{
  options.services.hookd = {
    enable = mkEnableOption "hookd, which uploads every path this machine builds to a signed binary cache";

    package = mkOption {
      type = types.package;
      default = pkgs.callPackage ./package.nix { };
      defaultText = lib.literalExpression "pkgs.callPackage ./package.nix { }";
      description = "The hookd package to use.";
    };

    cache = mkOption {
      type = types.str;
      example = "s3://my-bucket?region=eu-central-1";
      description = "Where to upload: `file:///dir`, `s3://bucket[/prefix]?…` or `https://host/path`.";
    };

    secretKeyFile = mkOption {
      type = types.path;
      example = "/var/lib/secrets/hookd-key";
      description = ''
        Signing key in Nix's format (`hookd keygen`). Keep it readable by root only (mode 0400):
        systemd hands a copy to the service through LoadCredential, so neither the hookd user nor the
        users who run builds can read the original.
      '';
    };

    compression = mkOption {
      type = types.enum [ "zstd" "xz" "none" ];
      default = "zstd";
      description = ''
        NAR compression. zstd needs Nix >= 2.4 (or 2.3.17) on the machines that substitute. A NAR that would
        shrink by less than 3 % is stored uncompressed. With zstd and no `compression_level` in `settings`,
        the level adapts: 1 at first and while compression holds uploads back, 3 while the cache is slower.
      '';
    };

    contentEncoding = mkOption {
      type = types.enum [ "none" "gzip" "zstd" ];
      default = "none";
      description = ''
        Store narinfos, listings and build logs compressed with this HTTP Content-Encoding (NARs never),
        like Nix's narinfo-, ls- and log-compression. Needs a cache that keeps the header: S3, or an HTTP
        server that stores it (not nginx's WebDAV); refused for file:// caches. Every Nix decodes it.
      '';
    };

    listings = mkOption {
      type = types.bool;
      default = true;
      description = "Write each uploaded path's NAR listing (`<hash>.ls`), as `write-nar-listing=true` does.";
    };

    realisations = mkOption {
      type = types.bool;
      default = true;
      description = ''
        Publish the signed realisations of content-addressed derivations built through the hook, so that
        clients with `ca-derivations` substitute them by derivation instead of rebuilding.
      '';
    };

    upstreamCaches = mkOption {
      type = types.listOf (types.submodule {
        options = {
          url = mkOption { type = types.str; description = "The upstream cache's URL."; };
          key = mkOption { type = types.str; description = "Its key name, or its public key (name:base64)."; };
        };
      });
      default = [ ];
      example = [ { url = "https://cache.nixos.org"; key = "cache.nixos.org-1:6NCHdD59X431o0gWypbMrAURkbJ16ZPMQFGspcDShjY="; } ];
      description = ''
        Caches whose paths are not uploaded again (consumers must use them as substituters too).
      '';
    };

    settings = mkOption {
      type = settingsFormat.type;
      default = { };
      example = { max_parallel = 16; retry_max = 300; };
      description = "Further settings for hookd's TOML config (see the README's configuration reference).";
    };

    environmentFile = mkOption {
      type = types.nullOr types.path;
      default = null;
      example = "/var/lib/secrets/hookd-s3.env";
      description = "Environment file with credentials (AWS_ACCESS_KEY_ID=…, AWS_SECRET_ACCESS_KEY=…).";
    };

    readWritePaths = mkOption {
      type = types.listOf types.str;
      default = [ ];
      example = [ "/var/cache/nix" ];
      description = "Directories the service may write besides its state (a file:// cache).";
    };

    user = mkOption { type = types.str; default = "hookd"; description = "User the daemon runs as."; };
    group = mkOption { type = types.str; default = "hookd"; description = "Group owning the socket (operators join it)."; };

    openMetrics = mkOption {
      type = types.bool;
      default = false;
      description = "Open the firewall for the Prometheus endpoint.";
    };

    metricsListen = mkOption {
      type = types.nullOr types.str;
      default = null;
      example = "127.0.0.1:9464";
      description = "HOST:PORT of the Prometheus endpoint (/metrics); off when null.";
    };

    gc = {
      enable = mkEnableOption "scheduled garbage collection of the cache (for throwaway caches)";
      dates = mkOption { type = types.str; default = "daily"; description = "When, as a systemd calendar expression."; };
      olderThan = mkOption { type = types.str; default = "30d"; description = "Retention: keep what was used since."; };
      maxSize = mkOption { type = types.nullOr types.str; default = null; example = "200G"; description = "Size budget."; };
      grace = mkOption { type = types.str; default = "1h"; description = "Never delete anything younger."; };
    };
  };

  config = mkIf cfg.enable {
    users.users.${cfg.user} = {
      isSystemUser = true;
      group = cfg.group;
      description = "hookd uploader";
    };
    users.groups.${cfg.group} = { };

    environment.systemPackages = [ cfg.package ];

    nix.settings.post-build-hook = hookLauncher;
    systemd.services.nix-daemon.environment = {
      HOOKD_SOCKET = "/run/hookd/hookd.sock";
      HOOKD_SPOOL_DIR = "/var/lib/hookd/spool";
    };

    systemd.sockets.hookd = {
      description = "hookd request socket";
      wantedBy = [ "sockets.target" ];
      socketConfig = {
        ListenStream = "/run/hookd/hookd.sock";
        SocketUser = "root";
        SocketGroup = cfg.group;
        SocketMode = "0660";
        RemoveOnStop = true;
      };
    };

    systemd.services.hookd = {
      description = "hookd: upload Nix build results to a signed binary cache";
      wantedBy = [ "multi-user.target" ];
      requires = [ "hookd.socket" ];
      after = [ "hookd.socket" "network-online.target" "nix-daemon.service" ];
      wants = [ "network-online.target" ];
      environment = serviceEnvironment // { HOOKD_SECRET_KEY_FILE = "%d/secret-key"; };
      path = [ config.nix.package ];
      serviceConfig = hardening // {
        Type = "notify";
        NotifyAccess = "main";
        ExecStart = "${cfg.package}/bin/hookd daemon --log-format journal";
        User = cfg.user;
        Group = cfg.group;
        StateDirectory = "hookd";
        StateDirectoryMode = "0750";
        RuntimeDirectory = "hookd";
        RuntimeDirectoryMode = "0750";
        RuntimeDirectoryPreserve = true;
        LoadCredential = [ "secret-key:${cfg.secretKeyFile}" ];
        EnvironmentFile = optional (cfg.environmentFile != null) cfg.environmentFile;
        WatchdogSec = 60;
        Restart = "on-failure";
        RestartSec = 5;
        TimeoutStopSec = 60;
      };
    };

    systemd.services.hookd-gc = mkIf cfg.gc.enable {
      description = "hookd: garbage-collect the binary cache";
      after = [ "network-online.target" ];
      wants = [ "network-online.target" ];
      environment = serviceEnvironment;
      serviceConfig = hardening // {
        Type = "oneshot";
        User = cfg.user;
        Group = cfg.group;
        StateDirectory = "hookd";
        EnvironmentFile = optional (cfg.environmentFile != null) cfg.environmentFile;
        ExecStart = concatStringsSep " " (
          [ "${cfg.package}/bin/hookd" "gc" "--older-than" cfg.gc.olderThan "--grace" cfg.gc.grace ]
          ++ optional (cfg.gc.maxSize != null) "--max-size ${cfg.gc.maxSize}"
        );
        Nice = 19;
      };
    };

    systemd.timers.hookd-gc = mkIf cfg.gc.enable {
      description = "Scheduled garbage collection of the hookd binary cache";
      wantedBy = [ "timers.target" ];
      timerConfig = {
        OnCalendar = cfg.gc.dates;
        RandomizedDelaySec = "1h";
        Persistent = true;
      };
    };

    networking.firewall.allowedTCPPorts = mkIf (cfg.openMetrics && cfg.metricsListen != null) [
      (lib.toInt (lib.last (lib.splitString ":" cfg.metricsListen)))
    ];

    assertions = [
      {
        assertion = !cfg.openMetrics || cfg.metricsListen != null;
        message = "services.hookd.openMetrics needs services.hookd.metricsListen";
      }
    ];
  };
}
