//! Hardware detection (sysinfo + CPU feature flags) and tier selection. Selection is a pure
//! function of the registry and a [`Hardware`] value so it can be tested with any figures.

use super::registry::{Registry, Tier};
use anyhow::Result;
use serde::Serialize;

/// What the machine has, as far as tier selection cares.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Hardware {
    /// Total RAM, in MiB.
    pub ram_mib: u64,
    /// Physical CPU cores.
    pub physical_cores: usize,
    /// Logical CPUs (hardware threads).
    pub logical_cpus: usize,
    /// CPU brand string, e.g. "AMD EPYC 7B13".
    pub cpu_brand: String,
    /// The CPU has AVX2.
    pub avx2: bool,
    /// The CPU has AVX-512F.
    pub avx512: bool,
}

impl Hardware {
    /// Reads this machine with sysinfo (RAM, cores, CPU brand) and the CPU feature flags.
    pub fn detect() -> Result<Hardware> {
        use sysinfo::{CpuRefreshKind, MemoryRefreshKind, RefreshKind, System};
        let sys = System::new_with_specifics(
            RefreshKind::nothing()
                .with_memory(MemoryRefreshKind::nothing().with_ram())
                .with_cpu(CpuRefreshKind::nothing()),
        )
        .map_err(|e| anyhow::anyhow!("cannot read the hardware: {e:?}"))?;
        let logical = sys.cpus().len().max(1);
        let physical = System::physical_core_count().unwrap_or(logical);
        let brand = sys
            .cpus()
            .first()
            .map(|c| c.brand().trim().to_string())
            .unwrap_or_default();
        #[cfg(target_arch = "x86_64")]
        let (avx2, avx512) = (
            std::is_x86_feature_detected!("avx2"),
            std::is_x86_feature_detected!("avx512f"),
        );
        #[cfg(not(target_arch = "x86_64"))]
        let (avx2, avx512) = (false, false);
        Ok(Hardware {
            ram_mib: sys.total_memory() / (1024 * 1024),
            physical_cores: physical,
            logical_cpus: logical,
            cpu_brand: brand,
            avx2,
            avx512,
        })
    }

    /// One line for humans.
    pub fn describe(&self) -> String {
        format!(
            "{} MiB RAM, {} physical cores ({} logical), CPU {:?}, AVX2 {}, AVX-512 {}",
            self.ram_mib,
            self.physical_cores,
            self.logical_cpus,
            self.cpu_brand,
            yes(self.avx2),
            yes(self.avx512)
        )
    }
}

fn yes(b: bool) -> &'static str {
    if b {
        "yes"
    } else {
        "no"
    }
}

/// How one tier compares with the machine.
#[derive(Debug, Clone, Serialize)]
pub struct TierFit {
    /// Tier name.
    pub tier: String,
    /// Whether the machine meets every requirement.
    pub fits: bool,
    /// What is missing (empty when it fits).
    pub missing: Vec<String>,
}

/// The outcome of tier selection.
#[derive(Debug, Clone, Serialize)]
pub struct Selection {
    /// The chosen tier, or None when no auto tier fits.
    pub tier: Option<String>,
    /// Why, in sentences for the admin.
    pub reasons: Vec<String>,
    /// The next auto tier up and what it lacks, if there is one.
    pub next_up: Option<TierFit>,
    /// Every auto tier, smallest first.
    pub fits: Vec<TierFit>,
}

/// Compares one tier's requirements with the hardware.
pub fn fit(tier: &Tier, hw: &Hardware) -> TierFit {
    let r = &tier.requires;
    let mut missing = Vec::new();
    if hw.ram_mib < r.min_ram_mib {
        missing.push(format!("{} MiB RAM (have {} MiB)", r.min_ram_mib, hw.ram_mib));
    }
    if hw.physical_cores < r.min_physical_cores {
        missing.push(format!(
            "{} physical cores (have {})",
            r.min_physical_cores, hw.physical_cores
        ));
    }
    if r.avx2 && !hw.avx2 {
        missing.push("a CPU with AVX2 (llama.cpp is built with -mavx2)".to_string());
    }
    TierFit {
        tier: tier.name.clone(),
        fits: missing.is_empty(),
        missing,
    }
}

/// Picks the largest `auto` tier (registry order is smallest first) whose requirements the
/// hardware meets, with the reasons and what the next tier up would need.
pub fn select_tier(reg: &Registry, hw: &Hardware) -> Selection {
    let fits: Vec<TierFit> = reg.tiers.iter().filter(|t| t.auto).map(|t| fit(t, hw)).collect();
    let best = fits.iter().rposition(|f| f.fits);
    let mut reasons = vec![format!("this machine: {}", hw.describe())];
    match best {
        Some(i) => {
            let t = reg.tier(&fits[i].tier).expect("tier exists");
            reasons.push(format!(
                "tier {} fits: it needs {} MiB RAM, {} physical cores{}",
                t.name,
                t.requires.min_ram_mib,
                t.requires.min_physical_cores,
                if t.requires.avx2 { ", AVX2" } else { "" }
            ));
        }
        None => reasons.push(format!(
            "no tier fits: the smallest ({}) needs {}",
            fits.first().map(|f| f.tier.as_str()).unwrap_or("-"),
            fits.first().map(|f| f.missing.join(", ")).unwrap_or_default()
        )),
    }
    let next_up = fits.get(best.map(|i| i + 1).unwrap_or(usize::MAX)).cloned();
    if let Some(n) = &next_up {
        reasons.push(format!("next tier up, {}, would need {}", n.tier, n.missing.join(", ")));
    } else if best.is_some() {
        reasons.push("this is the largest tier".to_string());
    }
    Selection {
        tier: best.map(|i| fits[i].tier.clone()),
        reasons,
        next_up,
        fits,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hw(cores: usize, gib: u64) -> Hardware {
        Hardware {
            ram_mib: gib * 1024,
            physical_cores: cores,
            logical_cpus: cores * 2,
            cpu_brand: "test".into(),
            avx2: true,
            avx512: false,
        }
    }

    #[test]
    fn picks_by_cores_and_ram() {
        let r = Registry::builtin().unwrap();
        let pick = |h: &Hardware| select_tier(&r, h).tier;
        assert_eq!(pick(&hw(2, 4)).as_deref(), Some("tiny"));
        assert_eq!(pick(&hw(4, 8)).as_deref(), Some("light"));
        assert_eq!(pick(&hw(8, 16)).as_deref(), Some("medium"));
        assert_eq!(pick(&hw(16, 32)).as_deref(), Some("heavy"));
        // RAM limits even with many cores, cores limit even with much RAM.
        assert_eq!(pick(&hw(16, 8)).as_deref(), Some("light"));
        assert_eq!(pick(&hw(2, 64)).as_deref(), Some("tiny"));
        assert_eq!(pick(&hw(1, 64)), None);
        let mut no_avx = hw(16, 32);
        no_avx.avx2 = false;
        let s = select_tier(&r, &no_avx);
        assert_eq!(s.tier, None);
        assert!(s.reasons.iter().any(|r| r.contains("AVX2")), "{:?}", s.reasons);
    }

    #[test]
    fn explains_next_tier() {
        let r = Registry::builtin().unwrap();
        let s = select_tier(&r, &hw(2, 24));
        assert_eq!(s.tier.as_deref(), Some("tiny"));
        let n = s.next_up.unwrap();
        assert_eq!(n.tier, "light");
        assert_eq!(n.missing, vec!["4 physical cores (have 2)".to_string()]);
        assert!(s.reasons.iter().any(|r| r.contains("next tier up, light")));
        // The test tier is never picked automatically.
        assert!(s.fits.iter().all(|f| f.tier != "test"));
    }

    #[test]
    fn reads_this_machine() {
        let h = Hardware::detect().unwrap();
        assert!(h.ram_mib > 256, "{h:?}");
        assert!(h.physical_cores >= 1 && h.logical_cpus >= h.physical_cores, "{h:?}");
        let avail = std::thread::available_parallelism().unwrap().get();
        assert!(h.logical_cpus >= avail, "{h:?} vs available_parallelism {avail}");
        let reg = Registry::builtin().unwrap();
        let s = select_tier(&reg, &h);
        eprintln!("{:?}", s.reasons);
        // Tiers grow monotonically, so some tier is picked exactly when tiny fits.
        assert_eq!(s.tier.is_some(), fit(reg.tier("tiny").unwrap(), &h).fits);
        if let Some(t) = &s.tier {
            assert!(fit(reg.tier(t).unwrap(), &h).fits);
        }
    }
}
