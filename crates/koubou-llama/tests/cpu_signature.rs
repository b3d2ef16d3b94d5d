//! `scripts/cpu-signature.sh` (the name builds for this CPU are cached under) and
//! `scripts/build-env.sh` (which puts a native build in a target dir of that name), run on
//! synthetic `/proc/cpuinfo` files.

use std::{path::PathBuf, process::Command};

fn script(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../scripts").join(name)
}

/// The signature for a cpuinfo file holding `flags` (one processor, or several alike).
fn signature_of(cpuinfo: &str) -> Result<String, String> {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("cpuinfo");
    std::fs::write(&file, cpuinfo).unwrap();
    let out = Command::new("bash").arg(script("cpu-signature.sh")).env("KOUBOU_CPUINFO", &file).output().unwrap();
    if out.status.success() {
        Ok(String::from_utf8(out.stdout).unwrap().trim().to_string())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

fn cpuinfo(flags: &str) -> String {
    format!("processor\t: 0\nvendor_id\t: X\nmodel name\t: X\nflags\t\t: {flags}\nbugs\t\t: spectre_v1\n\n")
}

/// A Zen 1-class EPYC: AVX2, FMA, F16C, no AVX-512.
const AVX2_ONLY: &str = "fpu vme de pse tsc msr pae mce cx8 apic sep mtrr pge mca cmov pat pse36 clflush mmx fxsr \
sse sse2 ht syscall nx mmxext fxsr_opt pdpe1gb rdtscp lm constant_tsc rep_good nopl cpuid pni pclmulqdq ssse3 fma \
cx16 sse4_1 sse4_2 movbe popcnt aes xsave avx f16c rdrand hypervisor lahf_lm cmp_legacy abm sse4a misalignsse \
3dnowprefetch topoext fsgsbase bmi1 avx2 smep bmi2 rdseed adx smap clflushopt sha_ni xsaveopt xsavec xgetbv1 arat";

/// The same plus AVX-512 (F/BW/CD/DQ/VL, VNNI, BF16), as on the Xeon and the Zen 4 here.
fn avx512() -> String {
    format!("{AVX2_ONLY} avx512f avx512dq avx512cd avx512bw avx512vl avx512_vnni avx512_bf16")
}

fn on_x86() -> bool {
    std::env::consts::ARCH == "x86_64"
}

#[test]
fn avx512_and_avx2_only_cpus_get_different_names_with_their_level() {
    let a = signature_of(&cpuinfo(AVX2_ONLY)).unwrap();
    let b = signature_of(&cpuinfo(&avx512())).unwrap();
    assert_ne!(a, b);
    if on_x86() {
        assert!(a.starts_with("x86_64-v3-"), "{a}");
        assert!(b.starts_with("x86_64-v4-"), "{b}");
    }
    // Any flag more or less is another CPU: a build for one never serves the other.
    let c = signature_of(&cpuinfo(&format!("{} avx512fp16", avx512()))).unwrap();
    assert_ne!(b, c);
    let old = signature_of(&cpuinfo("fpu sse sse2 cx16 lahf_lm popcnt sse4_1 sse4_2 ssse3")).unwrap();
    if on_x86() {
        assert!(old.starts_with("x86_64-v2-"), "{old}");
    }
}

#[test]
fn the_name_depends_on_the_set_of_flags_only() {
    let base = signature_of(&cpuinfo(&avx512())).unwrap();
    // Reordered, repeated, spaced differently, and on every processor of the machine.
    let all = avx512();
    let mut flags: Vec<&str> = all.split(' ').collect();
    flags.reverse();
    let shuffled = format!("{}  avx2 {}", flags.join(" "), flags[0]);
    let two = format!("{}{}", cpuinfo(&shuffled), cpuinfo(&avx512()).replace("processor\t: 0", "processor\t: 1"));
    assert_eq!(signature_of(&two).unwrap(), base);
    // Stable for the real machine too.
    let real = Command::new("bash").arg(script("cpu-signature.sh")).output().unwrap();
    assert!(real.status.success(), "{}", String::from_utf8_lossy(&real.stderr));
    let again = Command::new("bash").arg(script("cpu-signature.sh")).output().unwrap();
    assert_eq!(real.stdout, again.stdout);
}

#[test]
fn a_cpuinfo_without_flags_is_an_error_not_a_shared_name() {
    let err = signature_of("processor\t: 0\nmodel name\t: X\n").unwrap_err();
    assert!(err.contains("no flags line"), "{err}");
}

#[test]
fn build_env_puts_native_builds_in_a_target_dir_named_after_the_cpu() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("cpuinfo");
    std::fs::write(&file, cpuinfo(&avx512())).unwrap();
    let sig = signature_of(&cpuinfo(&avx512())).unwrap();
    let env = |build: Option<&str>| {
        let mut c = Command::new("bash");
        c.arg("-c")
            .arg(format!(
                "source '{}' /base && echo \"$CARGO_TARGET_DIR|$RUSTFLAGS\"",
                script("build-env.sh").display()
            ))
            .env("KOUBOU_CPUINFO", &file)
            .env("RUSTFLAGS", "-D warnings");
        if let Some(b) = build {
            c.env("KOUBOU_BUILD", b);
        }
        c.output().unwrap()
    };
    let native = env(None);
    assert!(native.status.success(), "{}", String::from_utf8_lossy(&native.stderr));
    assert_eq!(
        String::from_utf8(native.stdout).unwrap().trim(),
        format!("/base/native-{sig}|-D warnings -C target-cpu=native")
    );
    let portable = env(Some("portable"));
    assert_eq!(String::from_utf8(portable.stdout).unwrap().trim(), "/base/portable|-D warnings");
    let bad = env(Some("fastest"));
    assert_eq!(bad.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("native or portable"));
}
